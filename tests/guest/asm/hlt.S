/* Real mode: print, then halt with interrupts off. With no interrupt
 * controller nothing can wake the vCPU, so pyvmm stops the VM with status 0. */
    .include "realmode.inc"
    .code16
    .globl _start
_start:
    SETUP_DATA_SEGMENT
    PRINT16 message
    cli
    hlt
    EXIT16 0x77         /* not reached: a wake-up would exit with this telltale status */

message:
    .asciz "halting\n"
