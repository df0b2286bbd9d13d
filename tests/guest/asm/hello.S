/* Real mode: print a line on COM1 with one `out` per byte, then exit 0x2a
 * through the debug-exit port. Loaded at 0x10000, entered at 1000:0000. */
    .code16
    .globl _start
_start:
    mov %cs, %ax
    mov %ax, %ds
    mov $message, %si
    mov $0x3f8, %dx
next:
    lodsb
    test %al, %al
    jz done
    out %al, %dx
    jmp next
done:
    mov $0x2a, %al
    out %al, $0xf4
    hlt

message:
    .asciz "Hello from real mode\n"
