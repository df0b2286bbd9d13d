"""ACPI tables for the guest, written into guest memory below 1 MiB.

`build_acpi_tables()` lays out RSDP, XSDT, FADT, MADT and DSDT from
layout.ACPI_RSDP_ADDRESS upward and returns the RSDP's address, which goes
into boot_params.acpi_rsdp_addr; the RSDP also sits where the kernel's legacy
scan of 0xE0000-0xFFFFF finds it.
"""

from __future__ import annotations

from collections.abc import Iterable

from boot.acpi.dsdt import dsdt
from boot.acpi.tables import RSDP_SIZE, fadt, madt, rsdp, xsdt
from vmm.errors import PyvmmError
from vmm.layout import ACPI_RSDP_ADDRESS, ACPI_TABLES_END
from vmm.memory import GuestMemory

TABLE_ALIGNMENT = 16

__all__ = ["build_acpi_tables", "lay_out_sdts", "layout_acpi_tables"]


def _align(value: int) -> int:
    return (value + TABLE_ALIGNMENT - 1) & -TABLE_ALIGNMENT


def lay_out_sdts(cpus: int, devices: Iterable[bytes] = (), start: int = 0) -> tuple[dict[int, bytes], int]:
    """DSDT, FADT, MADT and XSDT placed one after another from `start`, keyed by address;
    and the XSDT's address, for the RSDP.

    `devices` are the DSDT entries the machine's devices made (devices/board.py).
    """
    try:
        madt_table = madt(cpus)
    except ValueError as err:
        raise PyvmmError(str(err)) from None
    tables: dict[int, bytes] = {}
    address = _align(start)
    tables[dsdt_address := address] = dsdt(devices)
    address = _align(address + len(tables[dsdt_address]))
    tables[fadt_address := address] = fadt(dsdt_address)
    address = _align(address + len(tables[fadt_address]))
    tables[madt_address := address] = madt_table
    address = _align(address + len(madt_table))
    tables[xsdt_address := address] = xsdt([fadt_address, madt_address])
    return tables, xsdt_address


def layout_acpi_tables(cpus: int, devices: Iterable[bytes] = (),
                       base: int = ACPI_RSDP_ADDRESS) -> dict[int, bytes]:
    """Every table, keyed by the guest-physical address it belongs at; the RSDP is at `base`."""
    tables, xsdt_address = lay_out_sdts(cpus, devices, base + RSDP_SIZE)
    tables[base] = rsdp(xsdt_address)
    return tables


def build_acpi_tables(memory: GuestMemory, cpus: int, devices: Iterable[bytes] = ()) -> int:
    """Write the tables for `cpus` vCPUs and the devices' DSDT entries.

    Returns the RSDP's guest-physical address, for boot_params.acpi_rsdp_addr.
    """
    tables = layout_acpi_tables(cpus, devices)
    end = max(address + len(table) for address, table in tables.items())
    if end > ACPI_TABLES_END:
        raise PyvmmError(f"ACPI tables need {end - ACPI_RSDP_ADDRESS} bytes, more than the "
                         f"{ACPI_TABLES_END - ACPI_RSDP_ADDRESS} bytes reserved for them")
    for address, table in tables.items():
        memory.write(address, table)
    return ACPI_RSDP_ADDRESS
