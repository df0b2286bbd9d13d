"""Decoding x86 descriptors: segment descriptors (GDT/LDT) and IDT gates.

Pure functions over raw bytes, shared by interrupt delivery and its tests.
Segment attributes come back in the layout QEMU's segment cache uses (the
descriptor's high dword bits 8..23 in place), so they can be loaded as is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

GATE_TASK = 0x5
GATE_INTERRUPT_16 = 0x6
GATE_TRAP_16 = 0x7
GATE_INTERRUPT_32 = 0xE  # also the 64-bit interrupt gate in long mode
GATE_TRAP_32 = 0xF

FLAGS_MASK = 0x00F0FF00
TYPE_CODE = 1 << 3  # in the 4-bit type of a code/data descriptor
TYPE_CONFORMING = 1 << 2
TYPE_WRITABLE = 1 << 1


@dataclass(frozen=True)
class Gate:
    selector: int
    offset: int
    type: int
    dpl: int
    present: bool
    ist: int = 0

    @property
    def is_trap(self) -> bool:
        """Trap gates leave IF alone; interrupt gates clear it."""
        return bool(self.type & 1)


@dataclass(frozen=True)
class SegmentDescriptor:
    base: int
    limit: int  # in bytes, granularity applied
    flags: int  # QEMU segment-cache layout

    @property
    def type(self) -> int:
        return (self.flags >> 8) & 0xF

    @property
    def system(self) -> bool:
        """A TSS, LDT or gate rather than code or data."""
        return not self.flags & (1 << 12)

    @property
    def dpl(self) -> int:
        return (self.flags >> 13) & 3

    @property
    def present(self) -> bool:
        return bool(self.flags & (1 << 15))

    @property
    def long(self) -> bool:
        return bool(self.flags & (1 << 21))

    @property
    def big(self) -> bool:
        """D/B: 32-bit code, or a 32-bit stack pointer."""
        return bool(self.flags & (1 << 22))

    @property
    def is_code(self) -> bool:
        return not self.system and bool(self.type & TYPE_CODE)

    @property
    def conforming(self) -> bool:
        return self.is_code and bool(self.type & TYPE_CONFORMING)


def parse_segment_descriptor(raw: bytes) -> SegmentDescriptor:
    low, high = struct.unpack_from("<II", raw)
    base = (low >> 16) | (high & 0xFF) << 16 | (high & 0xFF000000)
    limit = (low & 0xFFFF) | (high & 0x000F0000)
    if high & (1 << 23):  # G: limit in 4 KiB units
        limit = (limit << 12) | 0xFFF
    return SegmentDescriptor(base=base, limit=limit, flags=high & FLAGS_MASK)


def parse_gate32(raw: bytes) -> Gate:
    low, high = struct.unpack_from("<II", raw)
    return Gate(selector=low >> 16, offset=(low & 0xFFFF) | (high & 0xFFFF0000),
                type=(high >> 8) & 0xF, dpl=(high >> 13) & 3, present=bool(high & (1 << 15)))


def parse_gate64(raw: bytes) -> Gate:
    low, high = struct.unpack_from("<QQ", raw)
    offset = (low & 0xFFFF) | ((low >> 48) & 0xFFFF) << 16 | (high & 0xFFFFFFFF) << 32
    return Gate(selector=(low >> 16) & 0xFFFF, offset=offset, type=(low >> 40) & 0xF,
                dpl=(low >> 45) & 3, present=bool(low & (1 << 47)), ist=(low >> 32) & 7)
