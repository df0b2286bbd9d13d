"""Software CPU: a fault while delivering `int n` returns to the `int` itself (SDM vol. 3, 6.5),
so a handler that repairs the gate sees the interrupt taken when the instruction restarts.
(kvm-unit-tests' eventinj "NP exception" found that pyvmm returned past it.)"""

from __future__ import annotations

from tests.unit.tcg_support import (
    LOAD_ADDRESS,
    SETGATE_MACRO,
    assemble,
    long_mode_state,
)

GUEST = SETGATE_MACRO + r"""
    .code64
    .set IDT, 0x4000
    lidt idtr(%rip)
    SETGATE 13, gp_handler, 0x8e, 0
    SETGATE 0x21, int_handler, 0x8e, 0
    movw $0x80, IDT + 0x21 * 16 + 2     /* the gate's selector lies beyond the GDT: #GP(0x80) */
int_insn:
    int $0x21
    mov $0, %al
    out %al, $0xf4
    hlt
gp_handler:                             /* error code, RIP, CS, RFLAGS, RSP, SS */
    lea int_insn(%rip), %rax
    mov $'x', %bl
    cmp %rax, 8(%rsp)
    jne 1f
    cmpq $0x80, (%rsp)
    jne 1f
    mov $'g', %bl
1:  mov %bl, %al
    out %al, $0xe9
    movw $0x08, IDT + 0x21 * 16 + 2     /* repair the gate */
    add $8, %rsp
    iretq
int_handler:
    mov $'i', %al
    out %al, $0xe9
    iretq
    .p2align 3
idtr: .word 256 * 16 - 1
      .quad IDT
"""


def test_fault_delivering_int_n_restarts_the_instruction(machine, tmp_path):
    machine.memory.write(LOAD_ADDRESS, assemble(GUEST, tmp_path, link_address=LOAD_ADDRESS))
    machine.vcpus[0].set_state(long_mode_state(machine.memory, LOAD_ADDRESS))
    machine.run()
    assert bytes(machine.output.data) == b"gi"
    assert machine.exit.status == 0
