"""Software CPU, SYSENTER: Unicorn only calls the hook; pyvmm performs the instruction (vmm/tcg/syscall.py)."""

from __future__ import annotations

from tests.unit.tcg_support import (
    KERNEL_CS,
    LOAD_ADDRESS,
    SETGATE_MACRO,
    TcgMachine,
    assemble,
    long_mode_state,
)

SYSENTER = SETGATE_MACRO + r"""
    .code64
    .set IDT, 0x4000
    SETGATE 13, gp_handler, 0x8e, 0    /* #GP: kernel code, interrupt gate */
    SETGATE 6, ud_handler, 0x8e, 0     /* #UD */
    lidt idtr(%rip)

    mov $0x174, %ecx                   /* IA32_SYSENTER_CS */
    mov ${selector}, %eax
    xor %edx, %edx
    wrmsr
    mov $0x175, %ecx                   /* IA32_SYSENTER_ESP */
    mov $0x6F000, %eax
    wrmsr
    mov $0x176, %ecx                   /* IA32_SYSENTER_EIP */
    lea entry(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
    mov $'a', %al
    out %al, $0xe9
    sti
    sysenter
    mov $'N', %al                      /* fell through: SYSENTER did nothing */
    out %al, $0xe9
    jmp done
entry:
    mov $'S', %al                      /* at IA32_SYSENTER_EIP */
    out %al, $0xe9
    jmp done
gp_handler:
    mov $'G', %al
    out %al, $0xe9
    pop %rbx                           /* the error code */
    jmp done
ud_handler:
    mov $'U', %al
    out %al, $0xe9
done:
    mov $0x2a, %al
    out %al, $0xf4
    hlt

    .p2align 3
idtr:   .word 256 * 16 - 1
        .quad IDT
"""


def run(machine, tmp_path, selector: int):
    image = assemble(SYSENTER.replace("{selector}", str(selector)), tmp_path, link_address=LOAD_ADDRESS)
    machine.memory.write(LOAD_ADDRESS, image)
    machine.vcpus[0].set_state(long_mode_state(machine.memory, LOAD_ADDRESS))
    machine.run()
    assert machine.exit.status == 0x2A
    return bytes(machine.output.data), machine.vcpus[0].registers()


def test_sysenter_enters_at_the_msrs_with_interrupts_off(machine, tmp_path):
    output, registers = run(machine, tmp_path, KERNEL_CS)
    assert output == b"aS"
    assert registers["rsp"] == 0x6F000
    assert registers["cs"] == KERNEL_CS
    assert not registers["rflags"] & 0x200  # IF cleared


def test_sysenter_without_a_code_segment_is_a_general_protection_fault(machine, tmp_path):
    output, registers = run(machine, tmp_path, 0)
    assert output == b"aG"
    assert registers["rbx"] == 0  # error code 0


def test_sysenter_in_long_mode_is_an_invalid_opcode_on_an_amd_cpu(tmp_path):
    machine = TcgMachine(cpu_vendor="amd")
    try:
        output, _ = run(machine, tmp_path, KERNEL_CS)
        assert output == b"aU"
    finally:
        machine.close()
