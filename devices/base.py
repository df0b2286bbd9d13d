"""What a device model looks like to the rest of pyvmm.

A device is a plain state machine. It is registered on a bus at some base
address and only ever sees offsets from that base; it never sees an absolute
address, a file descriptor or an ioctl. Its interrupt is an injected
`IrqLine`, and anything it produces for the host (serial output, say) goes
through an injected callable, so device tests need neither KVM nor threads.

Accesses arrive as little-endian integers: `read(offset, size)` returns an
int that fits in `size` bytes, `write(offset, size, value)` takes one. Sizes
are 1, 2, 4 or 8. A device answers registers it does not implement the way
hardware does (reads of 0 or all ones, writes ignored), never by raising.
"""

from __future__ import annotations

from typing import Protocol


class Device(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class IrqLine(Protocol):
    """One interrupt input of the machine's interrupt controllers."""

    def set_level(self, high: bool) -> None:
        """Drive the line: level-triggered devices hold it high while they want service."""
        ...

    def pulse(self) -> None:
        """An edge: raise and lower the line."""
        ...


class NullIrqLine:
    """An IrqLine wired to nothing, for devices in tests and on machines without interrupts."""

    def __init__(self) -> None:
        self.level = False
        self.edges = 0

    def set_level(self, high: bool) -> None:
        if high and not self.level:
            self.edges += 1
        self.level = high

    def pulse(self) -> None:
        self.edges += 1


class SilentDevice:
    """Answers every read with zero and ignores writes.

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
