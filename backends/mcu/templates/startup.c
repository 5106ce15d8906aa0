/* Minimal Cortex-M startup for QEMU's MPS2/MPS3 boards: vector table, .data/.bss set-up,
 * semihosting, and a SysTick that counts processor-clock ticks (instructions under -icount). */
#include <stdint.h>
#include <stdlib.h>

extern uint32_t __etext_data, __data_start__, __data_end__, __bss_start__, __bss_end__;
extern uint32_t __stack_top__;
extern int main(void);
extern void initialise_monitor_handles(void);

volatile uint32_t dq_systick_wraps;

void Reset_Handler(void)
{
    uint32_t *src = &__etext_data, *dst = &__data_start__;
    while (dst < &__data_end__) {
        *dst++ = *src++;
    }
    for (dst = &__bss_start__; dst < &__bss_end__; ++dst) {
        *dst = 0;
    }
#if defined(__ARM_FP)
    /* grant full access to the FPU (CP10, CP11) before any float instruction */
    *(volatile uint32_t *)0xE000ED88 |= (0xFu << 20);
    __asm volatile("dsb\n isb");
#endif
#if defined(DQ_BARE)
    /* size probe: no semihosting, no stdio */
    (void)main();
    for (;;) {
    }
#else
    initialise_monitor_handles();
    exit(main());
#endif
}

static void Default_Handler(void)
{
    for (;;) {
    }
}

void SysTick_Handler(void)
{
    ++dq_systick_wraps;
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(&__stack_top__),
    Reset_Handler,
    Default_Handler, /* NMI */
    Default_Handler, /* HardFault */
    Default_Handler, Default_Handler, Default_Handler, 0, 0, 0, 0,
    Default_Handler, /* SVC */
    Default_Handler, 0,
    Default_Handler, /* PendSV */
    SysTick_Handler,
};
