"""The DSDT: the devices a PC's firmware would describe, in AML.

Linux on a hardware-reduced ACPI platform learns about devices only from
here: the serial port, the CMOS RTC, the i8042 keyboard controller, the
pvpanic port and every virtio-mmio window (`_HID` "LNRO0005", a
Memory32Fixed and an Interrupt in `_CRS`, as QEMU's microvm describes them;
the Debian kernel has no other way to find virtio-mmio devices). `\\_S5`
gives the value the guest writes into the sleep control register's SLP_TYP
field to power off.
"""

from __future__ import annotations

from typing import NamedTuple

from boot.acpi import aml
from boot.acpi.tables import DSDT_REVISION, sdt
from vmm.layout import (
    ACPI_SLP_TYP_S5,
    COM1_IRQ,
    COM1_PORT,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    I8042_KEYBOARD_IRQ,
    PVPANIC_PORT,
    RTC_IRQ,
    RTC_PORT,
)

MAX_VIRTIO_DEVICES = 0x1000  # device names V000-VFFF


class VirtioMmioWindow(NamedTuple):
    base: int
    size: int
    irq: int  # a GSI: I/O APIC input


def serial_port() -> bytes:
    return aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(
            aml.io(COM1_PORT, COM1_PORT, 0x08, 8),
            aml.irq_no_flags(COM1_IRQ),
        )),
    )


def cmos_rtc() -> bytes:
    return aml.device(
        "RTC",
        aml.name("_HID", aml.eisa_id("PNP0B00")),
        aml.name("_CRS", aml.resource_template(
            aml.io(RTC_PORT, RTC_PORT, 0x01, 2),
            aml.irq_no_flags(RTC_IRQ),
        )),
    )


def keyboard_controller() -> bytes:
    return aml.device(
        "PS2K",
        aml.name("_HID", aml.eisa_id("PNP0303")),
        aml.name("_CRS", aml.resource_template(
            aml.io(I8042_DATA_PORT, I8042_DATA_PORT, 0x01, 1),
            aml.io(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 0x01, 1),
            aml.irq_no_flags(I8042_KEYBOARD_IRQ),
        )),
    )


def pvpanic() -> bytes:
    return aml.device(
        "PEVT",
        aml.name("_HID", aml.string("QEMU0001")),
        aml.name("_CRS", aml.resource_template(aml.io(PVPANIC_PORT, PVPANIC_PORT, 0x01, 1))),
    )


def virtio_mmio(index: int, window: VirtioMmioWindow) -> bytes:
    return aml.device(
        f"V{index:03X}",
        aml.name("_HID", aml.string("LNRO0005")),
        aml.name("_UID", aml.integer(index)),
        aml.name("_CCA", aml.integer(1)),  # DMA is cache-coherent
        aml.name("_CRS", aml.resource_template(
            aml.memory32_fixed(window.base, window.size),
            # Edge-triggered, active high: devices/virtio/mmio.py says why.
            aml.interrupt(window.irq, edge=True),
        )),
    )


def sleep_state_s5() -> bytes:
    # ACPI 6.x, 7.4.2: SLP_TYPa, SLP_TYPb (ignored without PM1b), two reserved.
    return aml.name("\\_S5", aml.package(aml.integer(ACPI_SLP_TYP_S5), aml.integer(0),
                                         aml.integer(0), aml.integer(0)))


def dsdt(virtio_devices: list[VirtioMmioWindow]) -> bytes:
    if len(virtio_devices) > MAX_VIRTIO_DEVICES:
        raise ValueError(f"at most {MAX_VIRTIO_DEVICES} virtio-mmio devices")
    system_bus = aml.scope(
        "\\_SB",
        serial_port(),
        cmos_rtc(),
        keyboard_controller(),
        pvpanic(),
        *(virtio_mmio(index, VirtioMmioWindow(*w)) for index, w in enumerate(virtio_devices)),
    )
    return sdt(b"DSDT", DSDT_REVISION, system_bus + sleep_state_s5())
