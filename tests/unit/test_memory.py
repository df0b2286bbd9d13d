"""GuestMemory: RAM layout around the MMIO hole and bounds-checked access."""

from pathlib import Path

import pytest

from vmm.errors import GuestMemoryError, PyvmmError
from vmm.layout import HIGH_RAM_START, MMIO_HOLE_START, GiB, MiB
from vmm.memory import HUGE_PAGE, GuestMemory, ram_layout


def test_small_memory_is_one_region_from_zero():
    assert ram_layout(512 * MiB) == [(0, 512 * MiB)]


def test_large_memory_skips_the_mmio_hole():
    assert ram_layout(4 * GiB) == [(0, MMIO_HOLE_START), (HIGH_RAM_START, 4 * GiB - MMIO_HOLE_START)]


def test_read_back_what_was_written():
    memory = GuestMemory(2 * MiB)
    memory.write(0x1000, b"pyvmm")
    assert memory.read(0x1000, 5) == b"pyvmm"
    memory.write_u64(0x2000, 0x1122334455667788)
    assert memory.read_u32(0x2004) == 0x11223344
    assert memory.read_u16(0x2000) == 0x7788


@pytest.mark.parametrize(("address", "length"), [
    (2 * MiB, 1),            # just past the end
    (2 * MiB - 4, 8),        # straddles the end
    (-1, 1),                 # negative address
    (0, -1),                 # negative length
    (1 << 63, 1),            # far away
])
def test_out_of_bounds_access_is_refused(address, length):
    memory = GuestMemory(2 * MiB)
    with pytest.raises(GuestMemoryError):
        memory.read(address, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            memory.write(address, b"\0" * length)


def test_access_into_the_hole_is_refused_but_high_ram_works():
    memory = GuestMemory(MMIO_HOLE_START + 2 * MiB)
    assert not memory.contains(MMIO_HOLE_START)
    assert not memory.contains(MMIO_HOLE_START - 2, 4)  # straddles RAM and hole
    memory.write(HIGH_RAM_START + 10, b"high")
    assert memory.read(HIGH_RAM_START + 10, 4) == b"high"
    with pytest.raises(GuestMemoryError):
        memory.read(MMIO_HOLE_START, 1)


def test_view_is_zero_copy():
    memory = GuestMemory(2 * MiB)
    view = memory.view(0x3000, 4)
    view[:] = b"abcd"
    assert memory.read(0x3000, 4) == b"abcd"
    view.release()


@pytest.mark.parametrize("size", [0, 4096, 1 * MiB + 1])
def test_bad_sizes(size):
    with pytest.raises(PyvmmError):
        GuestMemory(size)


def test_firmware_maps_below_4g_beside_ram_and_may_not_overlap_it():
    memory = GuestMemory(MMIO_HOLE_START + 2 * MiB)
    image = bytes(range(256)) * 512  # 128 KiB
    memory.add_firmware(HIGH_RAM_START - len(image), image)
    assert memory.read(HIGH_RAM_START - 16, 16) == image[-16:]
    assert memory.read(0x1000, 4) == bytes(4)  # RAM unchanged...
    memory.write(HIGH_RAM_START, b"high")  # ...and high RAM still just above it
    assert memory.read(HIGH_RAM_START, 4) == b"high"
    assert not memory.contains(HIGH_RAM_START - 4, 8)  # regions are not one range
    assert memory.size == MMIO_HOLE_START + 2 * MiB  # firmware is not RAM
    with pytest.raises(PyvmmError):
        memory.add_firmware(MiB, image)  # over low RAM
    with pytest.raises(PyvmmError):
        memory.add_firmware(HIGH_RAM_START - 2 * len(image) + 4096, image)  # over the firmware
    memory.close()


def test_views_of_low_and_high_ram_are_windows_and_bad_ranges_are_refused():
    memory = GuestMemory(MMIO_HOLE_START + 2 * MiB)
    with memory.views([(0x1000, 4), (HIGH_RAM_START + 8, 4), (0x5000, 0)]) as (low, high, empty):
        low[:] = b"low!"
        high[:] = b"high"
        assert len(empty) == 0
    assert memory.read(0x1000, 4) == b"low!" and memory.read(HIGH_RAM_START + 8, 4) == b"high"
    for bad in [(MMIO_HOLE_START - 2, 4), (-1, 2), (0x1000, -1), (HIGH_RAM_START + 2 * MiB, 1)]:
        with pytest.raises(GuestMemoryError), memory.views([(0x1000, 4), bad]):
            pass


def _smaps_entry(address: int) -> list[str]:
    """This process's /proc/self/smaps lines for the mapping that holds `address`."""
    entry, inside = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        if inside:
            entry.append(line)
    return entry


def test_ram_sits_on_huge_page_boundaries_and_asks_for_huge_pages():
    # KVM maps guest RAM with 2 MiB pages only where the host address agrees with the
    # guest-physical one modulo 2 MiB and the host page is huge (memory.py says why it matters).
    memory = GuestMemory(4 * GiB + 6 * MiB)
    try:
        for region in memory.regions:
            host = region.host_address()
            assert host % HUGE_PAGE == 0 and region.guest_address % HUGE_PAGE == 0
            flags = next(line for line in _smaps_entry(host) if line.startswith("VmFlags:"))
            assert " hg" in flags, flags  # MADV_HUGEPAGE
        # What is written through the memory's own methods is what the aligned view holds.
        memory.write(0x1234, b"huge")
        memory.write(HIGH_RAM_START + 5, b"high")
        assert bytes(memory.regions[0].host[0x1234:0x1238]) == b"huge"
        assert bytes(memory.regions[1].host[5:9]) == b"high"
    finally:
        memory.close()
