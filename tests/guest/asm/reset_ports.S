/* Real mode: reset the machine through the register whose port and value
 * the test patched into the first two words of the image (pyvmm's exit
 * status 7), then report through the debug-exit port if still running. */
    .code16
    .globl _start
_start:
    jmp 1f
port:
    .word 0
value:
    .byte 0
1:  mov %cs, %ax
    mov %ax, %ds
    mov port, %dx
    mov value, %al
    out %al, %dx
    mov $0x77, %al                  /* not reached */
    out %al, $0xf4
