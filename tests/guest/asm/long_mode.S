/* Climb from real mode to protected mode to long mode on our own, printing at
 * each step, then exercise MMIO of 1, 2, 4 and 8 bytes on the scratch device
 * at 0xD0000000. Exits 0 when every value read back matches, 1 otherwise.
 *
 * Page tables (identity map of the first 4 GiB, 2 MiB pages) are built at
 * 0x20000: PML4 at 0x20000, PDPT at 0x21000, four page directories from 0x22000. */
    .include "protected.inc"
    .set PML4, 0x20000
    .set PDPT, 0x21000
    .set PD0,  0x22000
    .set SCRATCH, 0xD0000000

    .code16
    .globl _start
_start:
    ENTER_PROTECTED_MODE pm32
    PRINT32 msg_protected

    /* Zero the tables, then link PML4 -> PDPT -> 4 page directories. */
    mov $PML4, %edi
    xor %eax, %eax
    mov $(0x6000 / 4), %ecx
    cld
    rep stosl
    movl $(PDPT + 3), PML4
    movl $(PD0 + 0x0003), PDPT
    movl $(PD0 + 0x1003), PDPT + 8
    movl $(PD0 + 0x2003), PDPT + 16
    movl $(PD0 + 0x3003), PDPT + 24
    /* 2048 entries of 2 MiB: present, writable, large page. */
    mov $PD0, %edi
    mov $0x83, %eax
    mov $2048, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b

    mov %cr4, %eax
    or $(1 << 5), %eax              /* PAE */
    mov %eax, %cr4
    mov $PML4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx           /* EFER */
    rdmsr
    or $(1 << 8), %eax              /* LME */
    wrmsr
    mov %cr0, %eax
    or $(1 << 31), %eax             /* PG: long mode becomes active */
    mov %eax, %cr0
    ljmp $0x18, $(lm64 + LOAD)

    .code64
lm64:
    PRINT32 msg_long                /* the same loop assembles fine as 64-bit code */

    mov $SCRATCH, %rdi
    movb $0x11, (%rdi)
    movw $0x2233, 8(%rdi)
    movl $0x44556677, 16(%rdi)
    movabs $0x8899aabbccddeeff, %rax
    mov %rax, 24(%rdi)

    movzbl (%rdi), %eax
    cmp $0x11, %eax
    jne fail
    movzwl 8(%rdi), %eax
    cmp $0x2233, %eax
    jne fail
    mov 16(%rdi), %eax
    cmp $0x44556677, %eax
    jne fail
    mov 24(%rdi), %rax
    movabs $0x8899aabbccddeeff, %rbx
    cmp %rbx, %rax
    jne fail
    mov 28(%rdi), %eax              /* the high half of the 8-byte value */
    cmp $0x8899aabb, %eax
    jne fail

    PRINT32 msg_mmio
    xor %al, %al
    out %al, $0xf4
fail:
    PRINT32 msg_fail
    mov $1, %al
    out %al, $0xf4

msg_protected: .asciz "protected mode\n"
msg_long:      .asciz "long mode\n"
msg_mmio:      .asciz "mmio ok\n"
msg_fail:      .asciz "mmio FAIL\n"
    GDT
