/* Real mode: write CPUID leaf 1 ECX and EDX (the feature bits of leaf 1) to
 * COM1 as 8 little-endian bytes, then exit 0. */
    .include "realmode.inc"
    .code16
    .globl _start

/* The 4 bytes of %eax to COM1 (port in %dx), low byte first. */
.macro OUT32
    mov $4, %cx
1:  out %al, %dx
    shr $8, %eax
    loop 1b
.endm

_start:
    mov $1, %eax
    cpuid
    mov %ecx, %esi
    mov %edx, %edi
    mov $0x3f8, %dx
    mov %esi, %eax
    OUT32
    mov %edi, %eax
    OUT32
    EXIT16 0
    hlt
