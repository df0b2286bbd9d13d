"""The legacy PC ports Linux pokes at, answered quietly.

A PC has dozens of ISA ports that an OS touches while booting even when it
has no use for the device behind them. pyvmm has no model for most of them;
without this table each probe would land on the bus as "unclaimed" (all-ones
reads, a log line, a counter), which is the right answer for some of them
and just noise for others. Following kvmtool and Firecracker, the machine
registers these ranges with `SilentDevice`s, with the value a read should
return:

- all ones where the answer must be "no device here", so a driver's probe
  fails at its first check: COM2-COM4 (the 8250 driver's IER test), the
  parallel ports, the VGA CRT controller, and PCI configuration mechanism #1
  (0xcf8-0xcff but 0xcf9: Linux reads back its 0x80000000 address and, seeing all ones,
  decides there is no PCI type-1 access, nor type 2);
- zero for chips that exist on every PC and that nobody reads back in
  earnest: the two 8237 DMA controllers and their page registers, the 0xed
  delay port (`io_delay=0xed`), the math coprocessor's 0xf0/0xf1.

Port 0x92, "system control port A", gets a small model: bit 1 is the A20
gate (always on), bit 0 written as 1 is the "fast reset" some boot code
uses, so it reaches the machine's `reset()` callback. So does a reset
through port 0xcf9, the chipset's reset control register.

Deliberately absent: the 8259 PICs (0x20, 0xa0, ELCR 0x4d0), the 8254 PIT
(0x40) and port B (0x61), which KVM's in-kernel irqchip handles, or
devices/pic.py and pit.py do on the software CPU; and every port another
pyvmm device owns (0xf4, debug exit, is devices/debug_exit.py's). The port numbers live here rather than in vmm/layout.py
because each one is meaningful only next to its reason for being quiet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from devices.board import Board
from vmm.bus import BusDevice

ALL_ONES = 0xFFFF_FFFF_FFFF_FFFF  # SilentDevice cuts it to the access size


class SilentDevice:
    """Answers every read with `read_value` (cut to the access size) and ignores writes.

    For the legacy ports an OS probes that pyvmm has no model for (the POST
    code port 0x80, DMA page registers, ...), so the probes cost nothing and
    do not fill the log with unclaimed-port messages.
    """

    def __init__(self, read_value: int = 0) -> None:
        self.read_value = read_value

    def read(self, offset: int, size: int) -> int:
        return self.read_value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class QuietRange(NamedTuple):
    base: int
    size: int
    name: str
    read_value: int


QUIET_PORTS: tuple[QuietRange, ...] = (
    QuietRange(0x00, 0x20, "dma1", 0),  # 8237 #1: channels 0-3 (and their mirrors)
    QuietRange(0x80, 0x01, "post-code", 0),  # firmware's POST codes; also Linux's I/O delay port
    QuietRange(0x81, 0x0F, "dma-page", 0),  # page registers 0x81-0x8f
    QuietRange(0x90, 0x02, "dma-page-alias", 0),  # chipset alias of the page registers
    QuietRange(0x93, 0x0D, "dma-page-alias-2", 0),  # 0x93-0x9f (0x92 is port A)
    QuietRange(0xC0, 0x20, "dma2", 0),  # 8237 #2: channels 4-7
    QuietRange(0xED, 0x01, "io-delay", 0),  # Linux's alternative delay port
    QuietRange(0xF0, 0x02, "fpu", 0),  # coprocessor error/reset latch
    QuietRange(0x278, 0x03, "lpt2", ALL_ONES),
    QuietRange(0x2E8, 0x08, "com4", ALL_ONES),
    QuietRange(0x2F8, 0x08, "com2", ALL_ONES),
    QuietRange(0x378, 0x03, "lpt1", ALL_ONES),
    QuietRange(0x3B4, 0x02, "mda-crtc", ALL_ONES),
    QuietRange(0x3D4, 0x02, "vga-crtc", ALL_ONES),
    QuietRange(0x3E8, 0x08, "com3", ALL_ONES),
    # No PCI host bridge: configuration mechanism #1 around the reset control register.
    QuietRange(0xCF8, 0x01, "pci-config", ALL_ONES),  # a dword access at 0xcf8 lands here
    QuietRange(0xCFA, 0x06, "pci-config-2", ALL_ONES),
)

SYSTEM_CONTROL_A_PORT = 0x92
PORT_A_FAST_RESET = 0x01
PORT_A_A20 = 0x02


class SystemControlPortA:
    """Port 0x92: the A20 gate (always enabled) and the fast-reset bit."""

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset

    def read(self, offset: int, size: int) -> int:
        return PORT_A_A20

    def write(self, offset: int, size: int, value: int) -> None:
        if value & PORT_A_FAST_RESET:
            self._reset()


RESET_CONTROL_PORT = 0xCF9
RESET_CONTROL_SYS_RST = 0x02
RESET_CONTROL_RST_CPU = 0x04
RESET_CONTROL_FULL_RST = 0x08


class ResetControlRegister:
    """Port 0xcf9, the chipset's reset control register: writing RST_CPU resets the machine.

    Linux's `reboot=pci` writes SYS_RST then SYS_RST | RST_CPU here, and so does
    SeaBIOS before its last resort (int3 with no interrupt table, a triple fault);
    pyvmm's reset stub (boot/reset_stub.py) writes FULL_RST | RST_CPU | SYS_RST.
    """

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self._value = 0

    def read(self, offset: int, size: int) -> int:
        return self._value

    def write(self, offset: int, size: int, value: int) -> None:
        if value & RESET_CONTROL_RST_CPU:
            self._reset()
        else:
            self._value = value & RESET_CONTROL_SYS_RST


class PortBus(Protocol):
    def register(self, base: int, size: int, device: BusDevice, name: str) -> None: ...


def register_legacy_ports(bus: PortBus, reset: Callable[[], None]) -> None:
    """Register the quiet ranges and port A on the machine's PIO bus."""
    for entry in QUIET_PORTS:
        bus.register(entry.base, entry.size, SilentDevice(entry.read_value), entry.name)
    bus.register(SYSTEM_CONTROL_A_PORT, 1, SystemControlPortA(reset), "port-a")
    bus.register(RESET_CONTROL_PORT, 1, ResetControlRegister(reset), "reset-control")


def plug(board: Board) -> None:
    """The quiet ports, and the chipset's reset registers (port A, 0xcf9)."""
    register_legacy_ports(board.pio, lambda: board.reset("a chipset reset register, port 0x92 or 0xcf9"))
