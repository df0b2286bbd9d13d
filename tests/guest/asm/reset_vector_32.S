/* 32-bit protected mode: jump to 0xFFFFFFF0, where a PC's CPU leaves reset
 * and its firmware flash ends. pyvmm's reset stub there resets the machine. */
    .include "protected.inc"
    .code16
    .globl _start
_start:
    ENTER_PROTECTED_MODE pm32
    mov $0xfffffff0, %eax
    jmp *%eax
    mov $0x77, %al                  /* not reached */
    out %al, $0xf4
    GDT
