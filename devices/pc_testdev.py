"""QEMU's pc-testdev, the test device kvm-unit-tests drives (`boot --test-devices`).

As QEMU's hw/misc/pc-testdev.c lays it out:
- ports 0xe0-0xe3: a 32-bit scratch register, read and written at any width
  and byte offset (the emulator test checks string I/O against it); ports
  0xe8-0xeb: the same register again (QEMU splits accesses there into bytes,
  which changes nothing a guest can see);
- port 0xe4: "flush page": a 4-byte write names a guest page whose host
  mapping QEMU drops and restores, so that KVM must fault it in again. A
  hint with no architectural effect; pyvmm takes it and does nothing;
- ports 0x2000-0x2017: one per interrupt line (GSI) 0-23; a byte written
  there sets the line's level (non-zero high). The I/O APIC and PIC tests
  raise their interrupts this way;
- MMIO 0xff000000-0xff00ffff: 64 KiB of device memory that reads back what
  was written (the emulator test runs instructions against it, so every
  access is an MMIO exit the VMM's instruction emulation must get right).
"""

from __future__ import annotations

from collections.abc import Callable

from devices.board import Board
from devices.testdev import ScratchDevice
from vmm.bus import IrqLine

SCRATCH_PORT = 0xE0
SCRATCH_BYTE_PORT = 0xE8
FLUSH_PAGE_PORT = 0xE4
IRQ_LINE_PORT = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF00_0000
IOMEM_SIZE = 0x10000


class ScratchRegister:
    """Ports 0xe0-0xe3 (and 0xe8-0xeb): one 32-bit register, accessed at any width and offset."""

    def __init__(self) -> None:
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        shift = 8 * (offset & 3)
        return (self.value >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        shift = 8 * (offset & 3)
        mask = ((1 << (8 * size)) - 1) << shift
        self.value = (self.value & ~mask | (value << shift) & mask) & 0xFFFF_FFFF


class FlushPage:
    """Port 0xe4: takes the page address and ignores it (see the module docstring)."""

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class IrqLines:
    """Ports 0x2000 + n: drive interrupt line n to the written level.

    A line the machine cannot wire a device to (IRQ 2, the PIC cascade, on
    the software CPU's controllers) ignores the writes, as a pin with
    nothing behind it would.
    """

    def __init__(self, line: Callable[[int], IrqLine]) -> None:
        self._line = line
        self._lines: dict[int, IrqLine | None] = {}

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset not in self._lines:
            try:
                self._lines[offset] = self._line(offset)
            except ValueError:
                self._lines[offset] = None
        line = self._lines[offset]
        if line is not None:
            line.set_level(bool(value & 0xFF))


# -- where it sits: machines with --test-devices only ---------------------------------

def plug(board: Board) -> None:
    """Put pc-testdev's ports and memory on the machine's buses."""
    scratch = ScratchRegister()
    board.pio.register(SCRATCH_PORT, 4, scratch, "testdev-scratch")
    board.pio.register(FLUSH_PAGE_PORT, 4, FlushPage(), "testdev-flush")
    board.pio.register(SCRATCH_BYTE_PORT, 4, scratch, "testdev-scratch-byte")
    board.pio.register(IRQ_LINE_PORT, IRQ_LINES, IrqLines(board.irq), "testdev-irq")
    board.mmio.register(IOMEM_BASE, IOMEM_SIZE, ScratchDevice(IOMEM_SIZE), "testdev-iomem")
