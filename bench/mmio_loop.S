/* Benchmark guest: enter 32-bit protected mode, then COUNT 4-byte stores to
 * the scratch MMIO device of `boot --flat` machines (0xD0000000), then exit 0
 * through port 0xf4. Assembled with --defsym COUNT=N and -I tests/guest/asm. */
    .include "protected.inc"
    .code16
    .globl _start
_start:
    ENTER_PROTECTED_MODE flat32
    mov $COUNT, %ecx
    xor %eax, %eax
1:  mov %eax, 0xD0000000
    dec %ecx
    jnz 1b
    out %al, $0xf4
    hlt

    GDT
