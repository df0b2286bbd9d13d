"""ACPI table builders: RSDP, XSDT, FADT (hardware-reduced) and MADT, as bytes.

Layouts from the ACPI 6.x specification, chapter 5.2. Each builder returns a
complete table with its checksum set (all bytes of a table sum to 0 mod 256;
the RSDP has a second, extended checksum over its ACPI 2.0 part).
"""

from __future__ import annotations

import struct

from vmm.layout import (
    ACPI_PM_TIMER_PORT,
    ACPI_RESET_PORT,
    ACPI_RESET_VALUE,
    ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT,
    IOAPIC_BASE,
    LAPIC_BASE,
    TIMER_IOAPIC_PIN,
    TIMER_IRQ,
)

OEM_ID = b"PYVMM "  # 6 bytes
OEM_TABLE_ID = b"PYVMM   "  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1
SDT_HEADER_SIZE = 36
CHECKSUM_OFFSET = 9  # in the common table header

RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has the XSDT address
RSDP_SIZE = 36
RSDP_V1_SIZE = 20  # the part the first checksum covers
RSDP_CHECKSUM_OFFSET = 8
RSDP_XSDT_OFFSET = 24
RSDP_EXTENDED_CHECKSUM_OFFSET = 32

# FADT (ACPI 6.0: revision 6, minor version 0, 276 bytes)
FADT_REVISION = 6
FADT_MINOR_REVISION = 0
FADT_SIZE = 276
FADT_DSDT_OFFSET = 40  # 32-bit
FADT_X_DSDT_OFFSET = 140  # 64-bit
PM_TIMER_LENGTH = 4  # bytes, PM_TMR_LEN
FADT_FLAG_PWR_BUTTON = 1 << 4  # no fixed-hardware power button
FADT_FLAG_SLP_BUTTON = 1 << 5  # no fixed-hardware sleep button
FADT_FLAG_RESET_REG_SUP = 1 << 10
FADT_FLAG_HW_REDUCED_ACPI = 1 << 20
IAPC_BOOT_ARCH_8042 = 1 << 1  # an i8042 keyboard controller is present
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
HYPERVISOR_VENDOR = b"pyvmm\0\0\0"

# Generic Address Structure
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
GAS_ACCESS_DWORD = 3

# MADT (ACPI 5.0 layout, revision 3)
MADT_REVISION = 3
MADT_PCAT_COMPAT = 1 << 0  # a dual 8259 PIC is present (KVM's in-kernel irqchip has one)
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LOCAL_APIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF
IOAPIC_ID = 0
ISA_BUS = 0
MAX_XAPIC_CPUS = 255  # one-byte APIC ids; more needs x2APIC entries

XSDT_REVISION = 1
DSDT_REVISION = 2  # 2+: AML integers are 64-bit


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with that byte as 0) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte common header, then `body`."""
    if len(signature) != 4:
        raise ValueError(f"bad table signature {signature!r}")
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature, SDT_HEADER_SIZE + len(body), revision, 0, OEM_ID, OEM_TABLE_ID,
        OEM_REVISION, CREATOR_ID, CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def rsdp(xsdt_address: int) -> bytes:
    table = bytearray(struct.pack("<8sB6sBIIQB3x", RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION,
                                  0, RSDP_SIZE, xsdt_address, 0))
    table[RSDP_CHECKSUM_OFFSET] = checksum(table[:RSDP_V1_SIZE])
    table[RSDP_EXTENDED_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def xsdt(table_addresses: list[int]) -> bytes:
    return sdt(b"XSDT", XSDT_REVISION, struct.pack(f"<{len(table_addresses)}Q", *table_addresses))


def generic_address(port: int, access_size: int = GAS_ACCESS_BYTE) -> bytes:
    """A Generic Address Structure for a register in port I/O space, read whole (1 byte or 4)."""
    bit_width = 8 << (access_size - 1)
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, bit_width, 0, access_size, port)


def fadt(dsdt_address: int) -> bytes:
    """A hardware-reduced FADT: no PM1/GPE blocks, no SCI; sleep and reset registers and the
    PM timer in port I/O."""
    body = bytearray(FADT_SIZE - SDT_HEADER_SIZE)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into("<" + fmt, body, offset - SDT_HEADER_SIZE, *values)

    # FIRMWARE_CTRL stays 0. The DSDT's address goes in both DSDT fields: Linux
    # reads X_DSDT, SeaBIOS only the 32-bit one (it finds virtio-mmio disks there).
    put(FADT_DSDT_OFFSET, "I", dsdt_address)
    # The PM timer only in X_PM_TMR_BLK, which Linux reads (PM_TMR_BLK stays 0, as
    # the spec allows): SeaBIOS reads only the 32-bit field, and would otherwise time
    # everything with port reads of it (an exit each, on KVM) instead of the TSC.
    put(91, "B", PM_TIMER_LENGTH)
    put(109, "H", IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT)
    put(112, "I", FADT_FLAG_HW_REDUCED_ACPI | FADT_FLAG_RESET_REG_SUP
        | FADT_FLAG_PWR_BUTTON | FADT_FLAG_SLP_BUTTON)
    body[116 - SDT_HEADER_SIZE : 128 - SDT_HEADER_SIZE] = generic_address(ACPI_RESET_PORT)
    put(128, "B", ACPI_RESET_VALUE)
    put(131, "B", FADT_MINOR_REVISION)
    put(FADT_X_DSDT_OFFSET, "Q", dsdt_address)
    body[208 - SDT_HEADER_SIZE : 220 - SDT_HEADER_SIZE] = generic_address(ACPI_PM_TIMER_PORT, GAS_ACCESS_DWORD)
    body[244 - SDT_HEADER_SIZE : 256 - SDT_HEADER_SIZE] = generic_address(ACPI_SLEEP_CONTROL_PORT)
    body[256 - SDT_HEADER_SIZE : 268 - SDT_HEADER_SIZE] = generic_address(ACPI_SLEEP_STATUS_PORT)
    body[268 - SDT_HEADER_SIZE : 276 - SDT_HEADER_SIZE] = HYPERVISOR_VENDOR
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(cpus: int) -> bytes:
    """One local APIC per vCPU (APIC id = processor UID = index), the I/O APIC, the timer's IRQ override."""
    if not 1 <= cpus <= MAX_XAPIC_CPUS:
        raise ValueError(f"the MADT describes 1-{MAX_XAPIC_CPUS} CPUs, not {cpus}")
    entries = [struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, index, index, LOCAL_APIC_ENABLED)
               for index in range(cpus)]
    entries.append(struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, IOAPIC_BASE, 0))
    # The PIT's IRQ 0 reaches I/O APIC pin 2 (vmm/layout.py); flags 0: polarity
    # and trigger conform to the ISA bus (active high, edge).
    entries.append(struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, ISA_BUS, TIMER_IRQ, TIMER_IOAPIC_PIN, 0))
    # Every local APIC's LINT1 is wired to NMI, as firmware programs it.
    entries.append(struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 1))
    body = struct.pack("<II", LAPIC_BASE, MADT_PCAT_COMPAT) + b"".join(entries)
    return sdt(b"APIC", MADT_REVISION, body)
