/* The model alone (no stdio): what the application pays in flash and RAM for it. */
#include <stdint.h>

#include "model.h"

static uint8_t codes[DQ_INPUT_BYTES] __attribute__((aligned(8)));
static uint8_t output[DQ_OUTPUT_BYTES];

int main(void)
{
    return dq_model_run(codes, output) + output[0];
}

#if defined(DQ_PROFILE)
void dq_profile_step(int32_t step, const char *op)
{
    (void)step;
    (void)op;
}
#endif
