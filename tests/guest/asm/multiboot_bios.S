/* A multiboot (v1) kernel that relies on the BIOS's state, for tests/guest/test_multiboot.py.
 *
 * Linked at 0x8000 (real-mode code must lie below 1 MiB). It drops from the
 * protected mode it is entered in to real mode, loads the real-mode IDT (the
 * vector table at 0), and waits three times in `sti; hlt`: only the BIOS
 * timer (PIT channel 0, IRQ 0 through the 8259 at vector 8) can wake it, and
 * each wake must have advanced the BIOS tick count at 0x46c (the handler
 * counted the tick and acknowledged the 8259, or no second tick would come).
 * It checks the BIOS data area, prints a line through the COM1 port the BIOS
 * data area names and exits with status 0x21; each failed check exits with
 * its own status (0x22-0x24).
 */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003       /* page-align modules, memory info */
    .set BDA_COM1, 0x400
    .set BDA_EBDA_SEGMENT, 0x40e
    .set BDA_BASE_MEMORY_KIB, 0x413
    .set BDA_TICKS, 0x46c
    .set WAITS, 3

    .code32
    .text
    .globl _start
_start:
    jmp entry

    .p2align 2
header:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

entry:
    lgdt gdt_descriptor
    ljmp $0x08, $protected16

    .code16
protected16:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr0, %eax
    and $~1, %eax
    mov %eax, %cr0
    ljmp $0, $real

real:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x8000, %sp
    lidt ivt_descriptor

    mov $WAITS, %cx
wait:
    mov BDA_TICKS, %ebx
    sti
    hlt
    cli
    cmp BDA_TICKS, %ebx
    je no_tick
    loop wait

    cmpw $639, BDA_BASE_MEMORY_KIB
    jne bad_base_memory
    cmpw $0x9fc0, BDA_EBDA_SEGMENT
    jne bad_ebda

    mov BDA_COM1, %dx
    mov $message, %si
print:
    lodsb
    test %al, %al
    jz done
    out %al, %dx
    jmp print
done:
    mov $0x21, %al
    out %al, $0xf4

no_tick:
    mov $0x22, %al
    out %al, $0xf4
bad_base_memory:
    mov $0x23, %al
    out %al, $0xf4
bad_ebda:
    mov $0x24, %al
    out %al, $0xf4
    hlt

message:
    .asciz "woken by the BIOS timer in real mode\n"

    .p2align 3
gdt:
    .quad 0
    .quad 0x00009a000000ffff        /* 0x08: 16-bit code, base 0, limit 64 KiB */
    .quad 0x000092000000ffff        /* 0x10: 16-bit data, base 0, limit 64 KiB */
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long gdt
ivt_descriptor:
    .word 0x3ff
    .long 0
