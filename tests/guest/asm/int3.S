/* Real mode: a breakpoint through the interrupt vector table. The handler
 * prints "int3 handled" and exits 0. On the kvm_pvm development hosts KVM
 * cannot emulate `int3` in ring 0 and stops the guest instead (PLATFORM.md). */
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
    mov $1, %al                     /* the handler never returns */
    out %al, $0xf4

handler:
    mov $message, %si
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  xor %al, %al
    out %al, $0xf4

message:
    .asciz "int3 handled\n"
