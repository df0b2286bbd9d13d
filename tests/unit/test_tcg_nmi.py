"""Software CPU: an NMI blocks further NMIs until the handler's IRET, as on hardware.

(Linux's NMI entry code relies on it: a nested NMI would overwrite the first
one's frame on the shared IST stack.)
"""

from __future__ import annotations

from tests.unit.tcg_support import (
    LOAD_ADDRESS,
    SETGATE_MACRO,
    TcgMachine,
    assemble,
    long_mode_state,
)

# The handler sends itself a second NMI through the local APIC's ICR and
# spins a while before IRET. Output: deepest nesting, then NMIs handled.
NMI_DURING_NMI = SETGATE_MACRO + r"""
    .code64
    .set IDT, 0x4000
    .set LAPIC, 0xFEE00000
    SETGATE 2, nmi, 0x8e, 0
    lidt idtr(%rip)
    mov $LAPIC, %ebx
    movl $0x1ff, 0xF0(%rbx)            /* software-enable the local APIC */
    movl $0, 0x310(%rbx)               /* ICR: to APIC ID 0 (ourselves) ... */
    movl $0x4400, 0x300(%rbx)          /* ... delivery mode NMI, assert */
    mov $20000000, %ecx
1:  dec %ecx
    jnz 1b
    mov deepest(%rip), %al
    add $'0', %al
    out %al, $0xe9
    mov handled(%rip), %al
    add $'0', %al
    out %al, $0xe9
    mov $0x2a, %al
    out %al, $0xf4
    hlt
nmi:
    push %rax
    push %rcx
    incl depth(%rip)
    mov depth(%rip), %eax
    cmp deepest(%rip), %eax
    jbe 2f
    mov %eax, deepest(%rip)
2:  incl handled(%rip)
    cmpl $1, handled(%rip)
    jne 3f
    mov $LAPIC, %eax
    movl $0x4400, 0x300(%rax)          /* a second NMI while this one is handled */
    mov $20000000, %ecx
1:  dec %ecx
    jnz 1b
3:  decl depth(%rip)
    pop %rcx
    pop %rax
    iretq
    .p2align 3
idtr:     .word 256 * 16 - 1
          .quad IDT
depth:    .long 0
deepest:  .long 0
handled:  .long 0
"""


def test_a_second_nmi_waits_for_the_first_handlers_iret(tmp_path):
    machine = TcgMachine(irqchip=True)
    try:
        machine.memory.write(LOAD_ADDRESS, assemble(NMI_DURING_NMI, tmp_path, link_address=LOAD_ADDRESS))
        machine.vcpus[0].set_state(long_mode_state(machine.memory, LOAD_ADDRESS))
        machine.run(limit=1000)
        assert machine.exit.status == 0x2A
        assert bytes(machine.output.data) == b"12"  # never nested, and the second one was not lost
    finally:
        machine.close()
