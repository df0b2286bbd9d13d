"""Address-range buses, and the contract a device signs with them.

A device is registered on a half-open range [base, base + size). Ranges may
not overlap. An access is routed to the device with the offset from its base.
Accesses nobody claims behave like an empty ISA/PCI bus: reads return all
ones, writes vanish; each unclaimed address is logged once, at debug level,
and counted.

The contract (`BusDevice`, `IrqLine`) lives here, beside the bus, so that
nothing below the devices imports one (Firecracker keeps `BusDevice` next to
`Bus` for the same reason). A device is a plain state machine: it only ever
sees offsets from its base, never an absolute address, a file descriptor or
an ioctl. Its interrupt is an injected `IrqLine`, and anything it produces
for the host (serial output, say) goes through an injected callable, so
device tests need neither KVM nor threads.

Accesses arrive as little-endian integers: `read(offset, size)` returns an
int that fits in `size` bytes, `write(offset, size, value)` takes one. Sizes
are 1, 2, 4 or 8. A device answers registers it does not implement the way
hardware does (reads of 0 or all ones, writes ignored), never by raising.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class BusDevice(Protocol):
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


CACHE_LIMIT = 4096
_UNKNOWN = object()  # an address find() has not been asked about since the cache was last cleared


class BusConflictError(ValueError):
    """Two devices were registered on overlapping ranges (a bug in the machine builder)."""


@dataclass
class BusRange:
    base: int
    size: int
    device: BusDevice
    name: str
    accesses: int = 0
    end: int = field(init=False)

    def __post_init__(self) -> None:
        self.end = self.base + self.size


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ranges: list[BusRange] = []
        self._bases: list[int] = []
        self.unclaimed: dict[int, int] = {}  # address -> number of accesses
        # The exit path looks the same few addresses up again and again: remember
        # the answers. Bounded, because a guest chooses the addresses.
        self._cache: dict[int, BusRange | None] = {}

    def register(self, base: int, size: int, device: BusDevice, name: str) -> None:
        if size <= 0:
            raise ValueError(f"{self.name} range for {name} has size {size}")
        new = BusRange(base, size, device, name)
        index = bisect.bisect_left(self._bases, base)
        for neighbour in self.ranges[max(index - 1, 0) : index + 1]:
            if new.base < neighbour.end and neighbour.base < new.end:
                raise BusConflictError(
                    f"{self.name}: {name} at {base:#x}+{size:#x} overlaps "
                    f"{neighbour.name} at {neighbour.base:#x}+{neighbour.size:#x}"
                )
        self.ranges.insert(index, new)
        self._bases.insert(index, base)
        self._cache.clear()

    def find(self, address: int) -> BusRange | None:
        try:
            return self._cache[address]
        except KeyError:
            pass
        found = None
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            candidate = self.ranges[index]
            if address < candidate.end:
                found = candidate
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[address] = found
        return found

    def read(self, address: int, size: int) -> int:
        target = self._cache.get(address, _UNKNOWN)  # find()'s cache, without the call: every exit comes here
        if target is _UNKNOWN:
            target = self.find(address)
        if target is None:
            self._unclaimed(address, "read")
            return (1 << (8 * size)) - 1
        target.accesses += 1
        return target.device.read(address - target.base, size)

    def write(self, address: int, size: int, value: int) -> None:
        target = self._cache.get(address, _UNKNOWN)
        if target is _UNKNOWN:
            target = self.find(address)
        if target is None:
            self._unclaimed(address, "write")
            return
        target.accesses += 1
        target.device.write(address - target.base, size, value)

    def _unclaimed(self, address: int, what: str) -> None:
        count = self.unclaimed.get(address, 0)
        if count == 0:
            log.debug("%s: unclaimed %s at %#x", self.name, what, address)
        self.unclaimed[address] = count + 1
