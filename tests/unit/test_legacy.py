"""Quiet legacy ports: no overlap with pyvmm's devices, and the answers probes need."""

from __future__ import annotations

import pytest

from devices import boot_timer, debug_exit, fw_cfg, i8042, pic, pit, pvpanic, rtc, uart
from devices.legacy import (
    QUIET_PORTS,
    RESET_CONTROL_PORT,
    SYSTEM_CONTROL_A_PORT,
    SilentDevice,
    register_legacy_ports,
)
from vmm import layout
from vmm.bus import Bus

# Every port range another pyvmm device registers (the POST code port 0x80 is
# one of the quiet ports itself).
OWNED = [
    (uart.COM1_PORT, 8),
    (debug_exit.PORT, 1),
    (i8042.DATA_PORT, 1),
    (i8042.COMMAND_PORT, 1),
    (rtc.RTC_PORT, 2),
    (pic.MASTER_PORT, 2),
    (pic.SLAVE_PORT, 2),
    (pic.ELCR_PORT, 2),
    (pit.PORT, 4),
    (pit.PORT_B, 1),
    (pvpanic.PORT, 1),
    (fw_cfg.PORT, fw_cfg.PORT_COUNT),
    (boot_timer.PORT, 1),
    (layout.ACPI_SLEEP_CONTROL_PORT, 1),
    (layout.ACPI_SLEEP_STATUS_PORT, 1),
    (layout.ACPI_RESET_PORT, 1),
]


@pytest.fixture
def bus_and_resets():
    bus = Bus("pio")
    for base, size in OWNED:
        bus.register(base, size, SilentDevice(0x5A), f"owned-{base:#x}")
    resets = []
    register_legacy_ports(bus, lambda: resets.append(1))  # raises on any overlap
    return bus, resets


def test_quiet_ranges_do_not_overlap_each_other_or_owned_ports(bus_and_resets) -> None:
    bus, _ = bus_and_resets
    assert len(bus.ranges) == len(OWNED) + len(QUIET_PORTS) + 2  # port A, reset control


def test_no_quiet_port_is_unclaimed_after_registration(bus_and_resets) -> None:
    bus, _ = bus_and_resets
    for entry in QUIET_PORTS:
        for port in range(entry.base, entry.base + entry.size):
            bus.read(port, 1)
    assert bus.unclaimed == {}


def test_absent_com_ports_fail_the_8250_ier_probe(bus_and_resets) -> None:
    bus, _ = bus_and_resets
    for base in (0x2F8, 0x3E8, 0x2E8):
        bus.write(base + 1, 1, 0)
        assert bus.read(base + 1, 1) & 0x0F != 0  # Linux wants 0 here from a real UART


def test_pci_type1_probe_finds_no_host_bridge(bus_and_resets) -> None:
    bus, _ = bus_and_resets
    bus.write(0xCF8, 4, 0x8000_0000)
    assert bus.read(0xCF8, 4) != 0x8000_0000
    assert bus.read(0xCFC, 4) == 0xFFFF_FFFF


def test_dma_controller_reads_zero(bus_and_resets) -> None:
    bus, _ = bus_and_resets
    assert bus.read(0x08, 1) == 0
    assert bus.read(0xD0, 1) == 0


def test_port_a_reports_a20_and_fast_reset_calls_reset(bus_and_resets) -> None:
    bus, resets = bus_and_resets
    assert bus.read(SYSTEM_CONTROL_A_PORT, 1) & 0x02
    bus.write(SYSTEM_CONTROL_A_PORT, 1, 0x02)  # A20 only
    assert resets == []
    bus.write(SYSTEM_CONTROL_A_PORT, 1, 0x03)
    assert resets == [1]


def test_reset_control_register_resets_on_rst_cpu(bus_and_resets) -> None:
    bus, resets = bus_and_resets
    bus.write(RESET_CONTROL_PORT, 1, 0x02)  # SYS_RST alone: a full reset comes next, not yet
    assert resets == [] and bus.read(RESET_CONTROL_PORT, 1) == 0x02
    bus.write(RESET_CONTROL_PORT, 1, 0x06)  # Linux's reboot=pci, SeaBIOS's pci_reboot
    assert resets == [1]
