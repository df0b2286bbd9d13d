"""The e820 memory map: what the guest may use as RAM and what it must leave alone.

Built from GuestMemory's regions, so it says exactly what is RAM. Like real
firmware, it reports as reserved:
- the EBDA and everything up to 1 MiB (VGA hole, option ROMs, BIOS area; the
  ACPI tables live there), although pyvmm backs it with RAM;
- the top of the 32-bit space from the I/O APIC up (I/O APIC, local APIC, and
  the pages KVM keeps for its TSS and identity map).
The rest of the 32-bit MMIO hole (virtio-mmio windows) is neither RAM nor
reserved: a gap, as on real machines, whose devices the DSDT describes. Keeping
it a gap also lets Linux find room there for PCI instead of complaining that
there is none.
"""

from __future__ import annotations

from typing import NamedTuple

from vmm.layout import EBDA_START, HIGH_MEMORY_START, IOAPIC_BASE, MMIO_HOLE_END
from vmm.memory import GuestMemory

E820_RAM = 1
E820_RESERVED = 2

# Everything from the local/I/O APIC area to 4 GiB is platform space.
PLATFORM_RESERVED_START = IOAPIC_BASE
PLATFORM_RESERVED_END = MMIO_HOLE_END


class E820Entry(NamedTuple):
    address: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.address + self.size


def _subtract(start: int, end: int, hole_start: int, hole_end: int) -> list[tuple[int, int]]:
    """[start, end) minus [hole_start, hole_end), as up to two ranges."""
    pieces = []
    if start < min(end, hole_start):
        pieces.append((start, min(end, hole_start)))
    if max(start, hole_end) < end:
        pieces.append((max(start, hole_end), end))
    return pieces


def build_e820(memory: GuestMemory) -> list[E820Entry]:
    """The map for `memory`, sorted by address, with no overlaps."""
    entries = [E820Entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
               E820Entry(PLATFORM_RESERVED_START, PLATFORM_RESERVED_END - PLATFORM_RESERVED_START,
                         E820_RESERVED)]
    for region in memory.regions:
        for start, end in _subtract(region.guest_address, region.end, EBDA_START, HIGH_MEMORY_START):
            for start2, end2 in _subtract(start, end, PLATFORM_RESERVED_START, PLATFORM_RESERVED_END):
                entries.append(E820Entry(start2, end2 - start2, E820_RAM))
    return sorted(entries, key=lambda entry: entry.address)
