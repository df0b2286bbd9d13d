"""Recognising a multiboot (version 1) kernel by its header.

Every `--kernel` is probed here first (vmm/builder.py): a kernel is multiboot
when a header (magic 0x1BADB002, flags, checksum making the three sum to zero)
lies 32-bit aligned in its first 8 KiB. Only then is boot/multiboot.py, the
loader and the BIOS state it sets up, imported (start-up time).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

from vmm.errors import PyvmmError
from vmm.layout import KiB

HEADER_MAGIC = 0x1BADB002
HEADER_SEARCH_LIMIT = 8 * KiB
HEADER_SIZE = 12  # magic, flags, checksum; the address fields follow when flag 16 is set
ADDRESS_FIELDS_SIZE = 20

# Header flags. The low 16 bits are requirements: a loader that does not know
# one must refuse the kernel.
FLAG_PAGE_ALIGN_MODULES = 1 << 0  # pyvmm always page-aligns them
FLAG_MEMORY_INFO = 1 << 1  # always given
FLAG_VIDEO_MODE = 1 << 2  # a request for a graphics mode; pyvmm has no display, so text it stays
FLAG_ADDRESS_FIELDS = 1 << 16
KNOWN_REQUIRED_FLAGS = FLAG_PAGE_ALIGN_MODULES | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE


class MultibootError(PyvmmError):
    """A multiboot kernel pyvmm refuses; the message says why in one line."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"multiboot kernel {source}: {reason}")


class MultibootHeader(NamedTuple):
    offset: int  # in the file
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(data: bytes, source: str) -> MultibootHeader | None:
    """The multiboot header of `data`, None if it has no magic; MultibootError if it is malformed."""
    limit = min(len(data), HEADER_SEARCH_LIMIT) - HEADER_SIZE
    for offset in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic != HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFF_FFFF:
            raise MultibootError(source, f"bad header checksum {checksum:#x} at offset {offset:#x} "
                             f"(magic + flags + checksum must be 0 mod 2^32)")
        unknown = flags & 0xFFFF & ~KNOWN_REQUIRED_FLAGS
        if unknown:
            raise MultibootError(source, f"header requires features pyvmm does not know (flags {unknown:#x})")
        if not flags & FLAG_ADDRESS_FIELDS:
            return MultibootHeader(offset, flags)
        if offset + HEADER_SIZE + ADDRESS_FIELDS_SIZE > len(data):
            raise MultibootError(source, "header address fields lie beyond the end of the file")
        return MultibootHeader(offset, flags, *struct.unpack_from("<5I", data, offset + HEADER_SIZE))
    return None


def read_header(kernel_path: Path) -> MultibootHeader | None:
    """The multiboot header of the kernel file, read from its first bytes only; None if it has none."""
    try:
        with kernel_path.open("rb") as kernel:
            # A header at the search limit's end may have its address fields just beyond it.
            data = kernel.read(HEADER_SEARCH_LIMIT + ADDRESS_FIELDS_SIZE)
    except OSError as err:
        raise PyvmmError(f"cannot read kernel {kernel_path}: {err.strerror}") from None
    return find_header(data, str(kernel_path))
