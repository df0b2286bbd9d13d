/* Real mode: reads from a port no device claims return all ones, for `in`
 * of each size and for `rep insb`; writes there vanish. Prints "unclaimed ok"
 * and exits 0, or exits 1 at the first wrong value. */
    .include "realmode.inc"
    .code16
    .globl _start
    .set PORT, 0x2a0
_start:
    mov %cs, %ax
    mov %ax, %ds
    mov %ax, %es
    mov $PORT, %dx
    mov $0x55, %al
    out %al, %dx            /* dropped */
    in %dx, %al
    cmp $0xff, %al
    jne fail
    in %dx, %ax
    cmp $0xffff, %ax
    jne fail
    in %dx, %eax
    cmp $0xffffffff, %eax
    jne fail
    mov $buffer, %di
    mov $4, %cx
    cld
    rep insb
    cmpl $0xffffffff, buffer
    jne fail
    PRINT16 message
    EXIT16 0
fail:
    EXIT16 1

message:
    .asciz "unclaimed ok\n"
buffer:
    .long 0
