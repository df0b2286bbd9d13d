/* Real mode: the whole line leaves in one `rep outsb` (a string I/O exit with
 * count > 1 on KVM), then exit 0 through the debug-exit port. */
    .code16
    .globl _start
_start:
    mov %cs, %ax
    mov %ax, %ds
    mov $message, %si
    mov $(message_end - message), %cx
    mov $0x3f8, %dx
    cld
    rep outsb
    xor %al, %al
    out %al, $0xf4
    hlt

message:
    .ascii "Hello from rep outsb\n"
message_end:
