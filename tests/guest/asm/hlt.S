/* Real mode: print, then halt with interrupts off. With no interrupt
 * controller nothing can wake the vCPU, so pyvmm stops the VM with status 0. */
    .code16
    .globl _start
_start:
    mov %cs, %ax
    mov %ax, %ds
    mov $message, %si
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  cli
    hlt
    /* Not reached: a wake-up would land here and exit with a telltale status. */
    mov $0x77, %al
    out %al, $0xf4

message:
    .asciz "halting\n"
