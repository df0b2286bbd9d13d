/* Real mode: print "flooding", then write 'x' to COM1 forever. With pyvmm's
 * stdout a pipe nobody reads, the vCPU ends up blocked in the console write. */
    .include "realmode.inc"
    .code16
    .globl _start
_start:
    SETUP_DATA_SEGMENT
    PRINT16 message
    mov $0x3f8, %dx
    mov $'x', %al
3:  out %al, %dx
    jmp 3b

message:
    .asciz "flooding\n"
