"""The zero page: `struct boot_params`, the kernel's one input from its boot loader.

Per the 64-bit boot protocol the page starts zeroed, gets the kernel's setup
header copied in at 0x1f1, and then the loader fills in what it decided:
loader type, command line and initrd addresses, the e820 map, and the RSDP
address. Fields wider than 32 bits go half in the setup header and half in
the ext_* fields of boot_params.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from boot import bootparam as bp
from boot.e820 import E820Entry
from vmm.errors import PyvmmError


class BootParamsInput(NamedTuple):
    setup_header: bytes  # the kernel's header from 0x1f1, as found in the image
    e820: list[E820Entry]
    cmdline_address: int
    initrd_address: int = 0
    initrd_size: int = 0
    rsdp_address: int = 0
    code32_start: int | None = None  # for a bzImage: where its protected-mode code was loaded


def _split(value: int) -> tuple[int, int]:
    return value & 0xFFFF_FFFF, value >> 32


def build_boot_params(params: BootParamsInput) -> bytes:
    page = bytearray(bp.BOOT_PARAMS_SIZE)
    header_end = bp.SETUP_HEADER + len(params.setup_header)
    if header_end > bp.E820_TABLE:
        raise PyvmmError(f"kernel setup header is too long ({len(params.setup_header)} bytes)")
    page[bp.SETUP_HEADER : header_end] = params.setup_header

    page[bp.TYPE_OF_LOADER] = bp.TYPE_OF_LOADER_UNDEFINED
    # The heap only matters to the real-mode setup code, which this loader never
    # runs, but the protocol asks loaders to describe it, and others do.
    page[bp.LOADFLAGS] |= bp.CAN_USE_HEAP
    struct.pack_into("<H", page, bp.HEAP_END_PTR, bp.HEAP_END_PTR_VALUE)
    struct.pack_into("<H", page, bp.VID_MODE, bp.VID_MODE_NORMAL)
    if params.code32_start is not None:
        struct.pack_into("<I", page, bp.CODE32_START, params.code32_start)

    cmd_low, cmd_high = _split(params.cmdline_address)
    struct.pack_into("<I", page, bp.CMD_LINE_PTR, cmd_low)
    struct.pack_into("<I", page, bp.EXT_CMD_LINE_PTR, cmd_high)

    image_low, image_high = _split(params.initrd_address)
    size_low, size_high = _split(params.initrd_size)
    struct.pack_into("<II", page, bp.RAMDISK_IMAGE, image_low, size_low)
    struct.pack_into("<I", page, bp.EXT_RAMDISK_IMAGE, image_high)
    struct.pack_into("<I", page, bp.EXT_RAMDISK_SIZE, size_high)

    struct.pack_into("<Q", page, bp.ACPI_RSDP_ADDR, params.rsdp_address)

    if len(params.e820) > bp.E820_MAX_ENTRIES:
        raise PyvmmError(f"too many e820 entries ({len(params.e820)})")
    page[bp.E820_ENTRIES] = len(params.e820)
    for index, entry in enumerate(params.e820):
        struct.pack_into("<QQI", page, bp.E820_TABLE + index * bp.E820_ENTRY_SIZE,
                         entry.address, entry.size, entry.type)
    return bytes(page)
