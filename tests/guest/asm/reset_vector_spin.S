/* Real mode: overwrite the reset stub at F000:FFF0 with `jmp .` and jump
 * there, as a guest that scribbled over its firmware would end: it spins at
 * the reset vector forever, making no VM exit. */
    .code16
    .globl _start
_start:
    mov $0xf000, %ax
    mov %ax, %ds
    movw $0xfeeb, 0xfff0            /* jmp . */
    ljmp $0xf000, $0xfff0
