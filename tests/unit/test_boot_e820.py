"""The e820 map says exactly what is RAM."""

import pytest

from boot.e820 import E820_RAM, E820_RESERVED, E820Entry, build_e820
from vmm.memory import GuestMemory

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
def make_memory():
    made = []

    def make(size):
        made.append(GuestMemory(size))
        return made[-1]

    yield make
    for memory in made:
        memory.close()


def ram(entries):
    return [(e.address, e.end) for e in entries if e.type == E820_RAM]


def test_small_guest(make_memory):
    assert build_e820(make_memory(128 * MiB)) == [
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        E820Entry(0x100000, 127 * MiB, E820_RAM),
        E820Entry(0xFEC0_0000, 0x1_0000_0000 - 0xFEC0_0000, E820_RESERVED),
    ]


def test_large_guest_skips_the_mmio_hole(make_memory):
    memory = make_memory(4 * GiB)
    entries = build_e820(memory)
    assert ram(entries) == [(0, 0x9FC00), (0x100000, 3 * GiB), (4 * GiB, 5 * GiB)]
    # The virtio-mmio part of the hole is a gap: neither RAM nor reserved.
    assert not any(e.address <= 0xC000_0000 < e.end for e in entries)


def test_exactly_what_is_ram(make_memory):
    for size in (1 * MiB, 2 * MiB + 4096, 3 * GiB, 3 * GiB + 8 * MiB):
        memory = make_memory(size)
        entries = build_e820(memory)
        ram_bytes = sum(end - start for start, end in ram(entries))
        assert ram_bytes == size - (0x100000 - 0x9FC00)
        for start, end in ram(entries):
            assert memory.contains(start, end - start)
        ordered = sorted(entries, key=lambda e: e.address)
        assert entries == ordered
        for first, second in zip(ordered, ordered[1:], strict=False):
            assert first.end <= second.address
