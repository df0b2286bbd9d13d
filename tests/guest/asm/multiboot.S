/* A multiboot (v1) kernel that reports what it was handed, for tests/guest/test_multiboot.py.
 *
 * Linked at 0x100000. Built twice: as an ELF (loaded by its program headers)
 * and, with --defsym ADDRESS_FIELDS=1, as a raw image whose header carries
 * the load addresses (flag 16). It prints its entry state and every field of
 * the multiboot information structure on COM1, as `key=value` words (numbers
 * in hex); the test compares them with what pyvmm should have given. It ends
 * with a 4-byte write of 0x12345621 to the debug-exit port: status 0x21.
 */
    .set MB_MAGIC, 0x1BADB002
    .ifdef ADDRESS_FIELDS
    .set MB_FLAGS, 0x00010003       /* page-align modules, memory info, address fields */
    .else
    .set MB_FLAGS, 0x00000003
    .endif
    .set COM1, 0x3f8

/* Print TEXT, then the 32-bit value at MEM in hex. */
.macro PUT text, mem
    mov \mem, %eax
    PUTR "\text"
.endm
/* Print TEXT, then %eax in hex. */
.macro PUTR text
    PUTS_IMM "\text"
    call put_hex
.endm
/* Print TEXT, then the NUL-terminated string whose address is at MEM. */
.macro PUTS text, mem
    PUTS_IMM "\text"
    push %esi
    mov \mem, %esi
    call put_string
    pop %esi
.endm
.macro PUTS_IMM text
    .section .rodata
9:  .asciz "\text"
    .previous
    push %esi
    mov $9b, %esi
    call put_string
    pop %esi
.endm
.macro NEWLINE
    PUTS_IMM "\n"
.endm

    .code32
    .text
    .globl _start
_start:
    jmp entry

    .p2align 2
header:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .ifdef ADDRESS_FIELDS
    .long header, _start, image_end, bss_end, entry
    .endif

entry:
    /* Save the entry state before anything changes it. */
    mov %eax, saved_eax
    mov %ebx, saved_ebx
    mov $stack_top, %esp            /* the stack pointer is undefined at entry */
    pushf
    pop %eax
    mov %eax, saved_eflags
    mov %cr0, %eax
    mov %eax, saved_cr0

    PUT "entry eax=" saved_eax
    PUT " ebx=" saved_ebx
    PUT " cr0=" saved_cr0
    PUT " eflags=" saved_eflags
    mov %cs, %eax
    PUTR " cs="
    mov %ds, %eax
    PUTR " ds="
    mov %es, %eax
    PUTR " es="
    mov %ss, %eax
    PUTR " ss="
    /* CS base 0: `call` pushes the address we were linked at. */
    call 1f
1:  pop %eax
    sub $1b, %eax
    PUTR " cs_base="
    /* Flat data segments: a read just below 4 GiB through each faults (and,
     * with no IDT, ends the run in a triple fault) unless its limit is 4 GiB. */
    mov %ds:0xfffffffc, %eax
    mov %es:0xfffffffc, %eax
    mov %fs:0xfffffffc, %eax
    mov %gs:0xfffffffc, %eax
    mov %ss:0xfffffffc, %eax
    mov %fs, %eax
    PUTR " fs="
    mov %gs, %eax
    PUTR " gs="
    NEWLINE

    mov saved_ebx, %ebx
    PUT "info flags=" 0(%ebx)
    PUT " mem_lower=" 4(%ebx)
    PUT " mem_upper=" 8(%ebx)
    PUT " mods_count=" 20(%ebx)
    PUT " mmap_length=" 44(%ebx)
    NEWLINE

    PUTS "cmdline=" 16(%ebx)
    NEWLINE
    PUTS "loader=" 64(%ebx)
    NEWLINE

    /* The memory map: entries of `size` + 4 bytes. */
    mov 48(%ebx), %edi
    mov %edi, %ebp
    add 44(%ebx), %ebp
2:  cmp %ebp, %edi
    jae 3f
    PUT "mmap size=" 0(%edi)
    PUT " base=" 8(%edi)
    PUT ":" 4(%edi)
    PUT " length=" 16(%edi)
    PUT ":" 12(%edi)
    PUT " type=" 20(%edi)
    NEWLINE
    mov 0(%edi), %eax
    lea 4(%edi,%eax), %edi
    jmp 2b
3:

    /* The modules: start, end, name, and the sum of their bytes (mod 2^32). */
    mov 24(%ebx), %edi
    mov 20(%ebx), %ebp
4:  test %ebp, %ebp
    jz 6f
    PUT "module start=" 0(%edi)
    PUT " end=" 4(%edi)
    mov 0(%edi), %esi
    xor %eax, %eax
    xor %ecx, %ecx
5:  cmp 4(%edi), %esi
    jae 7f
    movzbl (%esi), %edx
    add %edx, %eax
    inc %esi
    jmp 5b
7:  PUTR " sum="
    PUTS " name=" 8(%edi)
    NEWLINE
    add $16, %edi
    dec %ebp
    jmp 4b
6:
    mov $0x12345621, %eax
    mov $0xf4, %dx
    out %eax, %dx
    hlt

/* Print the 8 hex digits of %eax. Clobbers nothing. */
put_hex:
    pusha
    mov %eax, %ebx
    mov $8, %ecx
    mov $COM1, %dx
1:  rol $4, %ebx
    mov %ebx, %eax
    and $0xf, %eax
    movb hex_digits(%eax), %al
    out %al, %dx
    loop 1b
    popa
    ret

/* Print the NUL-terminated string at %esi. Clobbers nothing. */
put_string:
    pusha
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  popa
    ret

hex_digits:
    .ascii "0123456789abcdef"

    .data
saved_eax: .long 0
saved_ebx: .long 0
saved_cr0: .long 0
saved_eflags: .long 0
image_end:

    .bss
    .p2align 4
    .space 4096
stack_top:
bss_end:
