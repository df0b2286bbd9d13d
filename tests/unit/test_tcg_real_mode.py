"""Software CPU, real mode: port output, string I/O, HLT, exceptions through the IVT, kicks."""

from __future__ import annotations

import threading

from tests.unit.tcg_support import assemble
from vmm.exits import Hlt, Interrupted, Shutdown

PRINT = """
    .code16
    mov %cs, %ax
    mov %ax, %ds
    mov $message, %si
    mov $0xe9, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0x2a, %al
    out %al, $0xf4
    hlt
message: .asciz "hello\\n"
"""


def test_out_reaches_the_port_bus_and_exit_port_stops(machine, tmp_path):
    machine.load(assemble(PRINT, tmp_path))
    result = machine.run()
    assert bytes(machine.output.data) == b"hello\n"
    assert machine.exit.status == 0x2A
    assert isinstance(result, Interrupted | Hlt)
    assert machine.vcpus[0].io_counts["IoOut"] == 7


def test_rep_outsb_and_port_input(machine, tmp_path):
    source = """
    .code16
    mov %cs, %ax
    mov %ax, %ds
    mov $0x2a0, %dx         /* nobody there: all ones */
    in %dx, %ax
    mov %ax, %bx
    mov $message, %si
    mov $5, %cx
    mov $0xe9, %dx
    cld
    rep outsb
    mov %bl, %al
    out %al, $0xf4
message: .ascii "abcde"
"""
    machine.load(assemble(source, tmp_path))
    machine.run()
    assert bytes(machine.output.data) == b"abcde"
    assert machine.exit.status == 0xFF


def test_hlt_without_interrupt_controller_is_an_hlt_exit_and_resumes_after_it(machine, tmp_path):
    source = """
    .code16
    mov $1, %al
    out %al, $0xe9
    hlt
    mov $2, %al
    out %al, $0xe9
    hlt
"""
    machine.load(assemble(source, tmp_path))
    assert isinstance(machine.vcpus[0].run(), Hlt)
    assert isinstance(machine.vcpus[0].run(), Hlt)
    assert bytes(machine.output.data) == b"\x01\x02"


def test_int3_and_divide_error_go_through_the_ivt(machine, tmp_path):
    source = """
    .code16
    mov %cs, %ax
    mov %ax, %ds
    xor %bx, %bx
    mov %bx, %es
    movw $bp_handler, %es:(3 * 4)
    movw %ax, %es:(3 * 4 + 2)
    movw $de_handler, %es:(0 * 4)
    movw %ax, %es:(0 * 4 + 2)
    mov %bx, %ss
    mov $0x1000, %sp
    int3
    mov $'r', %al            /* int3 returns to the next instruction */
    out %al, $0xe9
    xor %cl, %cl
    mov $7, %ax
    div %cl                  /* #DE: a fault, the handler sees the div itself */
    mov $'x', %al
    out %al, $0xe9
    mov $0, %al
    out %al, $0xf4
bp_handler:
    mov $'b', %al
    out %al, $0xe9
    iret
de_handler:
    mov $'d', %al
    out %al, $0xe9
    mov %sp, %bp
    addw $2, (%bp)           /* skip the two-byte div */
    iret
"""
    machine.load(assemble(source, tmp_path))
    machine.run()
    assert bytes(machine.output.data) == b"brdx"
    assert machine.exit.status == 0


def test_kick_from_another_thread_interrupts_a_spinning_guest(machine, tmp_path):
    machine.load(assemble(".code16\n1: inc %eax\n jmp 1b\n", tmp_path))
    vcpu = machine.vcpus[0]
    timer = threading.Timer(0.05, vcpu.kick)
    timer.start()
    try:
        assert isinstance(vcpu.run(), Interrupted)
    finally:
        timer.cancel()
    assert vcpu.registers()["rax"] > 0
    # The guest continues where it was stopped.
    threading.Timer(0.05, vcpu.kick).start()
    assert isinstance(vcpu.run(), Interrupted)


def test_kick_before_run_makes_the_next_run_return_at_once(machine, tmp_path):
    machine.load(assemble(".code16\n1: jmp 1b\n", tmp_path))
    machine.vcpus[0].kick()
    assert isinstance(machine.vcpus[0].run(), Interrupted)


def test_protected_mode_without_idt_triple_faults(machine, tmp_path):
    source = """
    .code16
    cli
    lgdtl %cs:gdt_desc
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(pm + 0x10000)
    .code32
pm: lidt (idt_desc + 0x10000)
    xor %ebx, %ebx
    div %ebx
    .p2align 3
gdt: .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdt_desc: .word 23
    .long gdt + 0x10000
idt_desc: .word 0
    .long 0
"""
    machine.load(assemble(source, tmp_path))
    assert isinstance(machine.run(), Shutdown)
