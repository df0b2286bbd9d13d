/* Real mode: print a line on COM1 with one `out` per byte, then exit 0x2a
 * through the debug-exit port. Loaded at 0x10000, entered at 1000:0000. */
    .include "realmode.inc"
    .code16
    .globl _start
_start:
    SETUP_DATA_SEGMENT
    PRINT16 message
    EXIT16 0x2a
    hlt

message:
    .asciz "Hello from real mode\n"
