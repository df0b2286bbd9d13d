/* Real mode: print "spinning", then loop forever without exits. Only a kick
 * from the VMM (on SIGTERM, Ctrl-C, ...) gets the vCPU out of the guest. */
    .include "realmode.inc"
    .code16
    .globl _start
_start:
    SETUP_DATA_SEGMENT
    PRINT16 message
3:  jmp 3b

message:
    .asciz "spinning\n"
