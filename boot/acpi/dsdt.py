"""The DSDT: the machine's devices, as each describes itself, and the power-off value.

Linux on a hardware-reduced ACPI platform learns about devices only from
here. Each device file's `plug()` (devices/board.py) adds its own entry to
the \\_SB scope: the serial port, the CMOS RTC, the i8042, the pvpanic port,
every virtio-mmio window (the Debian kernel has no other way to find
virtio-mmio devices). `\\_S5` gives the value the guest writes into the sleep
control register's SLP_TYP field to power off.
"""

from __future__ import annotations

from collections.abc import Iterable

from boot.acpi import aml
from boot.acpi.tables import DSDT_REVISION, sdt
from vmm.layout import ACPI_SLP_TYP_S5


def sleep_state_s5() -> bytes:
    # ACPI 6.x, 7.4.2: SLP_TYPa, SLP_TYPb (ignored without PM1b), two reserved.
    return aml.name("\\_S5", aml.package(aml.integer(ACPI_SLP_TYP_S5), aml.integer(0),
                                         aml.integer(0), aml.integer(0)))


def dsdt(devices: Iterable[bytes]) -> bytes:
    """The DSDT with `devices` (AML Device objects, in order) in the \\_SB scope."""
    return sdt(b"DSDT", DSDT_REVISION, aml.scope("\\_SB", *devices) + sleep_state_s5())
