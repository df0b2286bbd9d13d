"""QEMU's pc-testdev as kvm-unit-tests uses it: the scratch register, IRQ lines and device memory."""

from __future__ import annotations

from devices import pc_testdev
from devices.pc_testdev import IOMEM_BASE
from tests.unit.board import make_board
from vmm.bus import NullIrqLine
from vmm.layout import MiB
from vmm.memory import GuestMemory


def machine():
    board = make_board(GuestMemory(1 * MiB))
    lines: dict[int, NullIrqLine] = {}

    def line(gsi: int) -> NullIrqLine:
        if gsi == 2:
            raise ValueError("no device can be wired to interrupt 2")
        return lines.setdefault(gsi, NullIrqLine())

    board.irq = line
    pc_testdev.plug(board)
    return board.pio, board.mmio, lines


def test_scratch_register_at_every_width_and_offset():
    pio, _, _ = machine()
    pio.write(0xE0, 4, 0x11223344)
    assert pio.read(0xE0, 4) == 0x11223344
    assert pio.read(0xE1, 1) == 0x33
    assert pio.read(0xE2, 2) == 0x1122
    pio.write(0xE3, 1, 0xAA)
    assert pio.read(0xE0, 4) == 0xAA223344
    # 0xe8-0xeb is the same register.
    assert pio.read(0xE8, 4) == 0xAA223344
    pio.write(0xE8, 2, 0xBEEF)
    assert pio.read(0xE0, 4) == 0xAA22BEEF


def test_irq_line_ports_set_levels():
    pio, _, lines = machine()
    pio.write(0x2000 + 0x0E, 1, 1)
    assert lines[0x0E].level is True
    pio.write(0x2000 + 0x0E, 1, 0)
    assert lines[0x0E].level is False
    assert lines[0x0E].edges == 1
    pio.write(0x2000 + 2, 1, 1)  # a line with nothing behind it: ignored
    assert 2 not in lines


def test_device_memory_reads_back_writes():
    _, mmio, _ = machine()
    mmio.write(IOMEM_BASE + 0x100, 8, 0x0102030405060708)
    assert mmio.read(IOMEM_BASE + 0x104, 4) == 0x01020304
    assert mmio.read(IOMEM_BASE + 0xFFFF, 1) == 0


def test_flush_page_takes_writes():
    pio, _, _ = machine()
    pio.write(0xE4, 4, 0x12345000)
    assert pio.read(0xE0, 4) == 0  # the scratch register is not touched
