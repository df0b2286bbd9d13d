"""Software CPU: an interrupt the guest cannot take yet is delivered as soon as it can, not later.

kvm-unit-tests' eventinj checks exactly this, and so does any guest that
opens a short window with `sti; nop; cli` or relies on a nested NMI being
taken right at its handler's IRET (vmm/tcg/stop_hook.py watches for it).
"""

from __future__ import annotations

import pytest

from tests.unit.tcg_support import (
    LOAD_ADDRESS,
    SETGATE_MACRO,
    TcgMachine,
    assemble,
    long_mode_state,
    run_in_thread,
)
from vmm.tcg import stop_hook

# Two self-IPIs sent with IF clear must both be taken in the one-instruction
# window after `sti; nop` (the second when the first handler's IRET sets IF
# again). Then an NMI whose handler sends itself a second NMI: the second must
# be taken at the first handler's IRET, before the interrupted code goes on.
# Then a self-IPI sent with IF clear, and `sti; hlt`: it must be taken at the
# HLT, the instruction in STI's shadow (no timer runs: an interrupt lost there
# halts the guest for good). Output: interrupts counted right after the window,
# NMIs counted right after the first NMI's return point, interrupts after the HLT.
GUEST = SETGATE_MACRO + r"""
    .code64
    .set IDT, 0x4000
    .set LAPIC, 0xFEE00000
    .set SELF_FIXED, 0x40000           /* ICR: shorthand "self", delivery mode fixed */
    SETGATE 32, irq, 0x8e, 0
    SETGATE 33, irq, 0x8e, 0
    SETGATE 2, nmi, 0x8e, 0
    lidt idtr(%rip)
    mov $LAPIC, %ebx
    movl $0x1ff, 0xF0(%rbx)            /* software-enable the local APIC */
    cli
    movl $(SELF_FIXED | 32), 0x300(%rbx)
    movl $(SELF_FIXED | 33), 0x300(%rbx)
    jmp 1f                             /* end the block: both are pending now */
1:  sti
    nop
    cli
    mov interrupts(%rip), %al
    add $'0', %al
    out %al, $0xe9
    movl $0, 0x310(%rbx)               /* ICR: to APIC ID 0 (ourselves) ... */
    movl $0x4400, 0x300(%rbx)          /* ... delivery mode NMI */
    jmp 2f                             /* the NMI is taken here */
2:  mov nmis(%rip), %al
    add $'0', %al
    out %al, $0xe9
    cli
    movl $(SELF_FIXED | 32), 0x300(%rbx)
    sti
    hlt
    mov interrupts(%rip), %al
    add $'0', %al
    out %al, $0xe9
    mov $0x2a, %al
    out %al, $0xf4
    hlt
irq:
    incl interrupts(%rip)
    movl $0, 0xB0(%rbx)                /* EOI */
    iretq
nmi:
    incl nmis(%rip)
    cmpl $1, nmis(%rip)
    jne 3f
    movl $0x4400, 0x300(%rbx)          /* a second NMI, blocked until this handler's IRET */
3:  iretq
    .p2align 3
idtr:       .word 256 * 16 - 1
            .quad IDT
interrupts: .long 0
nmis:       .long 0
"""


@pytest.mark.parametrize("hook", ["exit-check", "native", "native-api", "python"])
def test_pending_interrupts_are_taken_in_the_first_window(tmp_path, monkeypatch, hook):
    if hook != "exit-check":  # a library pyvmm cannot patch there: a block hook
        monkeypatch.setattr(stop_hook.ExitCheckSlot, "claim", lambda handle: None)
    if hook == "python":  # the stop hook other hosts get
        monkeypatch.setattr(stop_hook.platform, "machine", lambda: "riscv64")
    if hook == "native-api":  # a library whose CPU state pyvmm cannot locate: IF through uc_reg_read
        monkeypatch.setattr(stop_hook, "live_rflags_address", lambda handle: None)
    machine = TcgMachine(irqchip=True)
    try:
        hook_of = machine.vm.engine.stop_hook
        assert hook_of.in_exit_check == (hook == "exit-check")
        assert hook_of.native == (hook != "python")
        assert hook_of.reads_rflags_directly == (hook in ("exit-check", "native"))
        machine.memory.write(LOAD_ADDRESS, assemble(GUEST, tmp_path, link_address=LOAD_ADDRESS))
        machine.vcpus[0].set_state(long_mode_state(machine.memory, LOAD_ADDRESS))
        run_in_thread(machine)
        assert machine.exit.status == 0x2A
        assert bytes(machine.output.data) == b"223"
    finally:
        machine.close()

