"""Software CPU, 64-bit mode: the guest's own IDT, page faults with CR2 and error codes,
software interrupts, the TSS stack switch, ring 3 and back through SYSCALL/SYSRET."""

from __future__ import annotations

import struct

from tests.unit.tcg_support import (
    IST1,
    KERNEL_CS,
    LOAD_ADDRESS,
    RSP0,
    SETGATE_MACRO,
    SUPERVISOR_ONLY_2M,
    USER_CS,
    assemble,
    long_mode_state,
)
from vmm.exits import Shutdown

LOG = 0x5000

GUEST = r"""
    .code64
    .set IDT, 0x4000
    .set LOG, 0x5000
    .set USER_STACK, 0x6F000
""" + SETGATE_MACRO + r"""
/* log(vector, a, b, c): four quadwords at the log cursor */
.macro LOG4 vec, a, b, c
    push %rax
    mov logptr(%rip), %rax
    movq $\vec, (%rax)
    mov \a, 8(%rax)
    mov \b, 16(%rax)
    mov \c, 24(%rax)
    addq $32, logptr(%rip)
    pop %rax
.endm

_start:
    SETGATE 14, pf_handler, 0x8e, 0
    SETGATE 8, df_handler, 0x8e, 1
    SETGATE 0x80, int80_handler, 0xee, 0
    SETGATE 3, bp_handler, 0xef, 0
    lidt idtr(%rip)

    /* two page faults in a row: neither may turn into a double fault */
    lea 1f(%rip), %r15
    movq $1, 0x40000123             /* write, not present */
1:  lea 1f(%rip), %r15
    mov 0x40000456, %rax            /* read, not present */
1:  mov $0x77, %rdi
    int $0x80                       /* software interrupt, same privilege */
    int3                            /* a trap gate */

    /* SYSCALL: STAR, LSTAR, SFMASK, EFER.SCE */
    mov $0xC0000081, %ecx
    xor %eax, %eax
    mov $((0x10 << 16) | 0x08), %edx
    wrmsr
    mov $0xC0000082, %ecx
    lea syscall_entry(%rip), %rax
    xor %edx, %edx
    wrmsr
    mov $0xC0000084, %ecx
    mov $0x200, %eax                /* SFMASK: IF */
    wrmsr
    mov $0xC0000080, %ecx
    rdmsr
    or $1, %eax
    wrmsr

    /* to ring 3 */
    push $0x1b
    push $USER_STACK
    push $0x3202                    /* IF, IOPL 3 */
    push $0x23
    lea user(%rip), %rax
    push %rax
    iretq

user:
    mov $'u', %al
    out %al, $0xe9
    mov $0x1234, %rax
    stc                             /* CF: not in SFMASK, so kept in the kernel */
    syscall
    mov $'s', %al
    out %al, $0xe9
    lea 1f(%rip), %r15
    movq $5, 0x200010               /* a supervisor-only page: protection fault from ring 3 */
1:  mov $0xdead, %rdi
    int $0x80                       /* from ring 3: stack switch to RSP0 */
    ud2

syscall_entry:
    pushfq
    pop %rdx
    LOG4 0x5c, %rcx, %r11, %rdx
    mov %cs, %rsi
    mov %rsp, %rdx
    mov %rax, %r8
    LOG4 0x5d, %rsi, %r8, %rdx
    sysretq

pf_handler:                         /* frame: error code, RIP, CS, RFLAGS, RSP, SS */
    push %rdx
    push %rcx
    push %rsi
    mov %cr2, %rdx
    mov 24(%rsp), %rcx              /* error code */
    mov 40(%rsp), %rsi              /* CS of the interrupted code */
    LOG4 14, %rdx, %rcx, %rsi
    mov %r15, 32(%rsp)              /* resume after the faulting instruction */
    pop %rsi
    pop %rcx
    pop %rdx
    add $8, %rsp
    iretq

int80_handler:                      /* frame: RIP, CS, RFLAGS, RSP, SS */
    push %rdx
    push %rsi
    lea 16(%rsp), %rdx              /* RSP when the handler started */
    mov 24(%rsp), %rsi              /* CS */
    LOG4 0x80, %rdx, %rdi, %rsi
    pop %rsi
    pop %rdx
    cmp $0xdead, %rdi
    je done
    iretq

bp_handler:
    push %rdx
    push %rsi
    push %rcx
    pushfq
    pop %rdx
    mov 24(%rsp), %rsi              /* RIP after the int3 */
    mov 32(%rsp), %rcx              /* CS */
    LOG4 3, %rdx, %rsi, %rcx
    pop %rcx
    pop %rsi
    pop %rdx
    iretq

df_handler:
    mov %rsp, %rdx
    xor %esi, %esi
    LOG4 8, %rdx, %rsi, %rsi
done:
    mov $0, %al
    out %al, $0xf4
    hlt

    .p2align 3
logptr: .quad LOG
idtr:   .word 256 * 16 - 1
        .quad IDT
"""


def read_log(machine):
    entries = []
    for address in range(LOG, LOG + 32 * 16, 32):
        entry = struct.unpack("<4Q", machine.memory.read(address, 32))
        if entry == (0, 0, 0, 0):
            break
        entries.append(entry)
    return entries


def test_idt_page_faults_software_interrupts_ring3_and_syscall(machine, tmp_path):
    image = assemble(GUEST, tmp_path, link_address=LOAD_ADDRESS)
    machine.memory.write(LOAD_ADDRESS, image)
    machine.vcpus[0].set_state(long_mode_state(machine.memory, LOAD_ADDRESS))
    python_syscalls = []
    machine.vcpus[0].on_syscall = lambda: python_syscalls.append(1)
    machine.run()
    assert machine.exit.status == 0, read_log(machine)
    assert bytes(machine.output.data) == b"us"
    log = read_log(machine)
    vectors = [entry[0] for entry in log]
    assert vectors == [14, 14, 0x80, 3, 0x5C, 0x5D, 14, 0x80]
    # The page faults went through QEMU's own delivery inside the engine
    # (vmm/tcg/native_exceptions.py); Python delivered only the three `int`s.
    assert machine.vm.delivery.delivered == 3

    write_fault, read_fault, int80, breakpoint, syscall, syscall_state, user_fault, user_int80 = log
    # CR2 and the error code: not present + write, then not present + read.
    assert write_fault[1:] == (0x40000123, 0b010, KERNEL_CS)
    assert read_fault[1:] == (0x40000456, 0b000, KERNEL_CS)
    # int $0x80 in ring 0: no stack switch, rdi passed through, CS of the caller.
    assert int80[2:] == (0x77, KERNEL_CS)
    # int3 through a trap gate: IF stays as it was (clear here), return CS kernel.
    assert breakpoint[3] == KERNEL_CS
    # SYSCALL: RCX = return address in user code, R11 = user RFLAGS (IF, IOPL 3),
    # SFMASK cleared IF in the kernel.
    user_rip, user_rflags, kernel_rflags = syscall[1:]
    assert LOAD_ADDRESS < user_rip < LOAD_ADDRESS + len(image)
    assert user_rflags & 0x3201 == 0x3201
    assert kernel_rflags & 0x201 == 0x001
    # SYSCALL was done inside the engine (vmm/tcg/native_syscall.py), not by Python.
    assert python_syscalls == []
    # In the kernel: CS from STAR, RAX untouched, the stack not switched (SYSCALL does not).
    cs, rax, rsp = syscall_state[1:]
    assert (cs, rax) == (KERNEL_CS, 0x1234)
    assert 0x6E000 < rsp <= 0x6F000
    # Ring 3 write to a supervisor page: present + write + user, taken on the RSP0 stack.
    assert user_fault[1:] == (SUPERVISOR_ONLY_2M + 0x10, 0b111, USER_CS | 3)
    # int $0x80 from ring 3: the handler runs on RSP0 with the 5-word frame.
    assert user_int80[1] == RSP0 - 5 * 8
    assert user_int80[2:] == (0xDEAD, USER_CS | 3)


def test_fault_on_a_missing_stack_becomes_a_double_fault_on_its_ist_stack(machine, tmp_path):
    source = GUEST.replace("    lidt idtr(%rip)\n", "    lidt idtr(%rip)\n    mov $0x40001000, %rsp\n", 1)
    image = assemble(source, tmp_path, link_address=LOAD_ADDRESS)
    machine.memory.write(LOAD_ADDRESS, image)
    machine.vcpus[0].set_state(long_mode_state(machine.memory, LOAD_ADDRESS))
    machine.run()
    log = read_log(machine)
    assert [entry[0] for entry in log] == [8]
    assert log[0][1] == IST1 - 6 * 8  # SS, RSP, RFLAGS, CS, RIP and the error code
    assert machine.exit.status == 0


def test_fault_with_no_usable_gate_at_all_is_a_triple_fault(machine, tmp_path):
    source = GUEST.replace("    SETGATE 8, df_handler, 0x8e, 1\n", "")
    source = source.replace("    lidt idtr(%rip)\n", "    lidt idtr(%rip)\n    mov $0x40001000, %rsp\n", 1)
    machine.memory.write(LOAD_ADDRESS, assemble(source, tmp_path, link_address=LOAD_ADDRESS))
    machine.vcpus[0].set_state(long_mode_state(machine.memory, LOAD_ADDRESS))
    assert isinstance(machine.run(), Shutdown)
