/* Real mode: a breakpoint through the interrupt vector table. The handler
 * prints "int3 handled" and exits 0. (kvm_pvm cannot emulate `int3` in
 * protected or long mode, PLATFORM.md, but does in real mode, as seen here.) */
    .include "realmode.inc"
    .code16
    .globl _start
_start:
    mov %cs, %ax
    mov %ax, %ds
    xor %bx, %bx
    mov %bx, %es
    movw $handler, %es:(3 * 4)      /* IVT entry 3: offset */
    movw %ax, %es:(3 * 4 + 2)       /* and segment */
    mov $0x1000, %sp
    mov %bx, %ss
    int3
    EXIT16 1                        /* the handler never returns */

handler:
    PRINT16 message
    EXIT16 0

message:
    .asciz "int3 handled\n"
