"""Address-range buses: which device answers a port or an MMIO address.

A device is registered on a half-open range [base, base + size). Ranges may
not overlap. An access is routed to the device with the offset from its base.
Accesses nobody claims behave like an empty ISA/PCI bus: reads return all
ones, writes vanish; each unclaimed address is logged once, at debug level,
and counted.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

from devices.base import Device

log = logging.getLogger(__name__)


CACHE_LIMIT = 4096


class BusConflictError(ValueError):
    """Two devices were registered on overlapping ranges (a bug in the machine builder)."""


@dataclass
class BusRange:
    base: int
    size: int
    device: Device
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

    def register(self, base: int, size: int, device: Device, name: str) -> None:
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
        target = self.find(address)
        if target is None:
            self._unclaimed(address, "read")
            return (1 << (8 * size)) - 1
        target.accesses += 1
        return target.device.read(address - target.base, size)

    def write(self, address: int, size: int, value: int) -> None:
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
