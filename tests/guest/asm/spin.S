/* Real mode: print "spinning", then loop forever without exits. Only a kick
 * from the VMM (on SIGTERM, Ctrl-C, ...) gets the vCPU out of the guest. */
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
2:  jmp 2b

message:
    .asciz "spinning\n"
