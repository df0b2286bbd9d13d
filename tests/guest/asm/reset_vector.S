/* Real mode: jump to the reset vector F000:FFF0, as Linux's reboot=bios does.
 * With no firmware, pyvmm's reset stub there resets the machine (status 7). */
    .code16
    .globl _start
_start:
    ljmp $0xf000, $0xfff0
    mov $0x77, %al                  /* not reached */
    out %al, $0xf4
