"""Bus routing: offsets, overlaps refused, unclaimed accesses."""

import logging

import pytest

from devices.testdev import ScratchDevice
from vmm.bus import Bus, BusConflictError


def test_devices_receive_offsets_from_their_base():
    bus = Bus("mmio")
    device = ScratchDevice()
    bus.register(0xD000_0000, 0x1000, device, "scratch")
    bus.write(0xD000_0008, 4, 0xDEADBEEF)
    assert list(device.accesses) == [("write", 8, 4)]
    assert bus.read(0xD000_0008, 2) == 0xBEEF
    assert bus.ranges[0].accesses == 2


@pytest.mark.parametrize(("base", "size"), [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3F0, 0x20)])
def test_overlapping_ranges_are_refused(base, size):
    bus = Bus("pio")
    bus.register(0x3F8, 8, ScratchDevice(), "com1")
    with pytest.raises(BusConflictError, match="overlaps com1"):
        bus.register(base, size, ScratchDevice(), "intruder")


def test_adjacent_ranges_are_fine():
    bus = Bus("pio")
    low, high = ScratchDevice(), ScratchDevice()
    bus.register(0x3F8, 8, low, "low")
    bus.register(0x3F0, 8, high, "below")
    bus.register(0x400, 8, ScratchDevice(), "above")
    bus.write(0x3F7, 1, 1)
    bus.write(0x3F8, 1, 2)
    assert list(high.accesses) == [("write", 7, 1)]
    assert list(low.accesses) == [("write", 0, 1)]


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_unclaimed_reads_are_all_ones(size):
    assert Bus("pio").read(0x1234, size) == (1 << (8 * size)) - 1


def test_unclaimed_accesses_are_counted_and_logged_once(caplog):
    bus = Bus("pio")
    with caplog.at_level(logging.DEBUG, logger="vmm.bus"):
        for _ in range(3):
            bus.write(0x99, 1, 0)
        bus.read(0x99, 1)
    assert bus.unclaimed == {0x99: 4}
    assert len([r for r in caplog.records if "0x99" in r.getMessage()]) == 1


def test_zero_size_is_refused():
    with pytest.raises(ValueError):
        Bus("pio").register(0, 0, ScratchDevice(), "empty")
