/* Test harness: quantizes each float input of inputs.bin on the device, runs the model, and
 * writes the output codes to outputs.bin (semihosting files); prints per-inference SysTick
 * ticks, which under QEMU -icount shift=0 are instructions / DQ_INSNS_PER_TICK. */
#include <stdint.h>
#include <stdio.h>

#include "model.h"

#define SYST_CSR (*(volatile uint32_t *)0xE000E010)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018)
#define SYST_RELOAD 0xFFFFFFu

extern volatile uint32_t dq_systick_wraps;

static uint64_t ticks_now(void)
{
    uint32_t wraps, value;
    do {
        wraps = dq_systick_wraps;
        value = SYST_CVR;
    } while (wraps != dq_systick_wraps);
    return (uint64_t)wraps * (SYST_RELOAD + 1u) + (SYST_RELOAD - value);
}

#if defined(DQ_PROFILE)
/* ticks spent in each op, printed per inference: "dq: op STEP KIND TICKS" */
void dq_profile_step(int32_t step, const char *op)
{
    static uint64_t last;
    uint64_t now = ticks_now();
    if (step >= 0) {
        printf("dq: op %ld %s %llu\n", (long)step, op, (unsigned long long)(now - last));
    }
    last = ticks_now();
}
#endif

static float input[DQ_INPUT_COUNT];
/* DQ_INPUT_BYTES: one byte per code, or the float bytes a float island reads directly */
static uint8_t codes[DQ_INPUT_BYTES] __attribute__((aligned(8)));
static uint8_t output[DQ_OUTPUT_BYTES];

int main(void)
{
    FILE *in = fopen("inputs.bin", "rb");
    FILE *out = fopen("outputs.bin", "wb");
    if (in == NULL || out == NULL) {
        printf("dq: cannot open inputs.bin / outputs.bin\n");
        return 1;
    }
    SYST_RVR = SYST_RELOAD;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* enable, interrupt on wrap, processor clock */
    int count = 0;
    while (fread(input, sizeof(float), DQ_INPUT_COUNT, in) == DQ_INPUT_COUNT) {
        dq_model_quantize_input(input, codes);
        uint64_t start = ticks_now();
        int status = dq_model_run(codes, output);
        uint64_t stop = ticks_now();
        if (status != 0) {
            printf("dq: model_run failed with %d\n", status);
            return 1;
        }
        fwrite(output, 1, DQ_OUTPUT_BYTES, out);
        printf("dq: ticks %llu\n", (unsigned long long)(stop - start));
        ++count;
    }
    fclose(out);
    fclose(in);
    printf("dq: done %d\n", count);
    return 0;
}
