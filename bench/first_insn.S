/* Benchmark guest for start-up: its first instruction prints '!' on COM1
 * (so the host sees the moment the guest started), then it exits through
 * the debug-exit port 0xf4. Position independent, 11 bytes: pyvmm runs it
 * with `boot --flat`, QEMU as the last bytes of a 64 KiB firmware image,
 * at the reset vector. */
    .code16
    .globl _start
_start:
    mov $0x3f8, %dx
    mov $'!', %al
    out %al, %dx
    mov $0x10, %al
    out %al, $0xf4
    hlt
