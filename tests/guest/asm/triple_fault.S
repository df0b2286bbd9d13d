/* Protected mode with an empty IDT, then a divide by zero. The #DE cannot be
 * delivered, nor the #DF after it: the CPU shuts down (a triple fault). */
    .include "protected.inc"
    .code16
    .globl _start
_start:
    ENTER_PROTECTED_MODE pm32
    lidt (empty_idt + LOAD)
    xor %ebx, %ebx
    div %ebx
    mov $0x77, %al                  /* not reached */
    out %al, $0xf4

empty_idt:
    .word 0
    .long 0
    GDT
