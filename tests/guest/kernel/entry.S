/* Entry points of the test kernel.
 *
 * The image is linked at 0x100000 (the bzImage's protected-mode code); the
 * boot protocol's 64-bit entry point is 0x200 bytes in. The loader enters it
 * in long mode with identity page tables, interrupts off and RSI pointing at
 * boot_params.
 *
 * ap_trampoline is copied by kmain to TRAMPOLINE (a page below 1 MiB) and is
 * where a SIPI starts each application processor, in real mode: it loads its
 * own GDT, enables PAE + long mode with the BSP's CR3 and far-jumps straight
 * into 64-bit code, then calls ap_main on the stack kmain left for it. */
    .set TRAMPOLINE, 0x10000
    .set TRAMP_SEGMENT, TRAMPOLINE >> 4

    .section .text.entry, "ax"
    .code64
    .org 0x200
    .globl entry64
entry64:
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi
    call kmain
1:  cli
    hlt
    jmp 1b

/* IRQ handler stub for the UART interrupt: save the caller-saved registers,
 * call the C handler, return with iretq. */
    .globl uart_irq_entry
uart_irq_entry:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    call uart_irq
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq

/* ---- CPU tests (cpu_tests.c): exceptions, interrupts, ring 3, SYSCALL ---- */

/* Every vector lands in isr_common with the same frame: 15 saved registers,
 * the vector, an error code (0 where the CPU pushes none), then what the CPU
 * pushed (RIP, CS, RFLAGS, RSP, SS). isr_dispatch(frame) may change RIP. */
.macro ISR vector, has_error_code
    .globl isr_\vector
isr_\vector:
    .if \has_error_code == 0
    push $0
    .endif
    push $\vector
    jmp isr_common
.endm
    ISR 13, 1
    ISR 14, 1
    ISR 0x30, 0
    ISR 0x31, 0
    ISR 0x80, 0
    ISR 0x40, 0
isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call isr_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

/* probe_read/probe_write(address): one access that may fault; the #PF
 * handler resumes at probe_fixup, which returns -1. */
    .globl probe_read, probe_write, probe_fixup
probe_read:
    mov (%rdi), %rax
    ret
probe_write:
    movq $0x5a, (%rdi)
    xor %eax, %eax
    ret
probe_fixup:
    mov $-1, %rax
    ret

/* enter_user(entry, user_stack): iretq to ring 3; returns when user code
 * makes system call 99. */
    .globl enter_user, syscall_entry, user_main
enter_user:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, saved_kernel_rsp(%rip)
    push $0x1b                          /* SS: user data, RPL 3 */
    push %rsi                           /* RSP */
    push $0x202                         /* RFLAGS: IF */
    push $0x23                          /* CS: user code, RPL 3 */
    push %rdi                           /* RIP */
    iretq

/* SYSCALL lands here in ring 0, still on the user stack, IF cleared by SFMASK. */
syscall_entry:
    cmp $99, %rax
    je 1f
    push %rcx                           /* user RIP */
    push %r11                           /* user RFLAGS */
    mov %rax, %rdi
    mov %rsp, %rdx
    call syscall_handler                /* (number, first argument in rsi, stack) */
    pop %r11
    pop %rcx
    sysretq
1:  mov saved_kernel_rsp(%rip), %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* Ring 3: a system call, a software interrupt, then back to the kernel. */
user_main:
    mov $42, %eax
    mov $7, %esi
    syscall
    int $0x80
    mov $99, %eax
    syscall

    .data
saved_kernel_rsp: .quad 0

    .text
    .globl ap_trampoline, ap_trampoline_end, ap_cr3, ap_stack
    .code16
ap_trampoline:
    cli
    mov $TRAMP_SEGMENT, %ax
    mov %ax, %ds
    lgdtl (ap_gdt_descriptor - ap_trampoline)
    mov %cr4, %eax
    or $(1 << 5), %eax                      /* PAE */
    mov %eax, %cr4
    mov (ap_cr3 - ap_trampoline), %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx                   /* EFER.LME */
    rdmsr
    or $(1 << 8), %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                    /* PG | PE */
    mov %eax, %cr0
    ljmpl $0x08, $(ap_long - ap_trampoline + TRAMPOLINE)
    .code64
ap_long:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov (ap_stack - ap_trampoline + TRAMPOLINE), %rsp
    movabs $ap_main, %rax
    call *%rax
2:  cli
    hlt
    jmp 2b
    .p2align 3
ap_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF                /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF                /* 0x10: data */
ap_gdt_descriptor:
    .word 3 * 8 - 1
    .long ap_gdt - ap_trampoline + TRAMPOLINE
    .p2align 3
ap_cr3:   .quad 0
ap_stack: .quad 0
ap_trampoline_end:

    .bss
    .p2align 12
    .space 16384
stack_top:
