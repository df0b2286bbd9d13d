/* Benchmark guest: COUNT `out` instructions to port 0x80, then exit 0 through
 * port 0xf4. Assembled with --defsym COUNT=N. */
    .code16
    .globl _start
_start:
    mov $COUNT, %ecx
    xor %al, %al
1:  out %al, $0x80
    dec %ecx
    jnz 1b
    out %al, $0xf4
    hlt
