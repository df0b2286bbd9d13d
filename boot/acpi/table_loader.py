"""ACPI tables for firmware, through QEMU's BIOS linker-loader (fw_cfg `etc/table-loader`).

Firmware (SeaBIOS here) does not take tables at fixed addresses: it
allocates memory for each fw_cfg file the loader names, copies the file in,
then patches the pointers between tables and fixes their checksums, following
128-byte commands (QEMU's hw/acpi/bios-linker-loader.c describes them):

- ALLOCATE: file[56], le32 alignment, u8 zone (1: high memory, 2: the
  F-segment, where an OS's legacy scan finds the RSDP);
- ADD_POINTER: destination file[56], source file[56], le32 offset, u8 size:
  add the source file's address to the `size`-byte little-endian value at
  `offset` in the destination file;
- ADD_CHECKSUM: file[56], le32 offset of the checksum byte, le32 start,
  le32 length: make the bytes in [start, start + length) sum to zero again.

The tables are the ones `boot.acpi` builds for a direct kernel boot (the
same DSDT and MADT), laid out from offset 0 of `etc/acpi/tables`; the RSDP
is `etc/acpi/rsdp`. Each table's pointers hold offsets into
`etc/acpi/tables` and its checksum is valid for those, so after the firmware
adds the base address, the checksum commands restore it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from boot.acpi import lay_out_sdts
from boot.acpi.tables import (
    CHECKSUM_OFFSET,
    FADT_DSDT_OFFSET,
    FADT_X_DSDT_OFFSET,
    RSDP_CHECKSUM_OFFSET,
    RSDP_EXTENDED_CHECKSUM_OFFSET,
    RSDP_SIZE,
    RSDP_V1_SIZE,
    RSDP_XSDT_OFFSET,
    SDT_HEADER_SIZE,
    rsdp,
)

TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"
LOADER_FILE = "etc/table-loader"

COMMAND_SIZE = 128
FILE_NAME_SIZE = 56
COMMAND_ALLOCATE = 1
COMMAND_ADD_POINTER = 2
COMMAND_ADD_CHECKSUM = 3
ZONE_HIGH = 1
ZONE_FSEG = 2
TABLES_ALIGNMENT = 64
RSDP_ALIGNMENT = 16


def _name(file: str) -> bytes:
    return file.encode().ljust(FILE_NAME_SIZE, b"\0")


def allocate(file: str, alignment: int, zone: int) -> bytes:
    return struct.pack("<I56sIB", COMMAND_ALLOCATE, _name(file), alignment, zone).ljust(COMMAND_SIZE, b"\0")


def add_pointer(destination: str, source: str, offset: int, size: int) -> bytes:
    return struct.pack("<I56s56sIB", COMMAND_ADD_POINTER, _name(destination), _name(source),
                       offset, size).ljust(COMMAND_SIZE, b"\0")


def add_checksum(file: str, offset: int, start: int, length: int) -> bytes:
    return struct.pack("<I56sIII", COMMAND_ADD_CHECKSUM, _name(file), offset, start,
                       length).ljust(COMMAND_SIZE, b"\0")


@dataclass(frozen=True)
class LoaderFiles:
    """The three fw_cfg files, by name."""

    tables: bytes
    rsdp: bytes
    loader: bytes

    def items(self) -> Iterable[tuple[str, bytes]]:
        return ((TABLES_FILE, self.tables), (RSDP_FILE, self.rsdp), (LOADER_FILE, self.loader))


def build_loader_files(cpus: int, devices: Iterable[bytes] = ()) -> LoaderFiles:
    """`devices`: the devices' DSDT entries (devices/board.py)."""
    tables, xsdt_offset = lay_out_sdts(cpus, devices, start=0)
    blob = bytearray(max(offset + len(table) for offset, table in tables.items()))
    for offset, table in tables.items():
        blob[offset : offset + len(table)] = table
    commands = [allocate(TABLES_FILE, TABLES_ALIGNMENT, ZONE_HIGH), allocate(RSDP_FILE, RSDP_ALIGNMENT, ZONE_FSEG)]
    for offset, table in sorted(tables.items()):
        signature = table[:4]
        if signature == b"FACP":
            commands.append(add_pointer(TABLES_FILE, TABLES_FILE, offset + FADT_DSDT_OFFSET, 4))
            commands.append(add_pointer(TABLES_FILE, TABLES_FILE, offset + FADT_X_DSDT_OFFSET, 8))
        elif signature == b"XSDT":
            for entry in range(offset + SDT_HEADER_SIZE, offset + len(table), 8):
                commands.append(add_pointer(TABLES_FILE, TABLES_FILE, entry, 8))
        commands.append(add_checksum(TABLES_FILE, offset + CHECKSUM_OFFSET, offset, len(table)))
    commands.append(add_pointer(RSDP_FILE, TABLES_FILE, RSDP_XSDT_OFFSET, 8))
    commands.append(add_checksum(RSDP_FILE, RSDP_CHECKSUM_OFFSET, 0, RSDP_V1_SIZE))
    commands.append(add_checksum(RSDP_FILE, RSDP_EXTENDED_CHECKSUM_OFFSET, 0, RSDP_SIZE))
    return LoaderFiles(tables=bytes(blob), rsdp=rsdp(xsdt_offset), loader=b"".join(commands))
