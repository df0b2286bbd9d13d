"""A small AML encoder: just the ACPI Machine Language the DSDT needs.

Every function returns the encoded bytes of one AML object, so objects nest by
passing bytes in: `device("COM1", name("_HID", eisa_id("PNP0501")), ...)`.
Encodings follow the ACPI specification, chapter 20 (AML grammar) and 6.4
(resource descriptors); integers use the shortest encoding, as iasl does, so
the output round-trips through `iasl -d` and back.
"""

from __future__ import annotations

import re
import struct

# Opcodes (ACPI 6.x, 20.3)
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F

# Resource descriptor tags (ACPI 6.x, 6.4)
SMALL_IRQ = 0x22  # IRQ descriptor, 2 bytes: no flags byte (edge, active high, exclusive)
SMALL_IRQ_WITH_FLAGS = 0x23
SMALL_IO = 0x47
SMALL_END_TAG = 0x79
LARGE_MEMORY32_FIXED = 0x86
LARGE_EXTENDED_INTERRUPT = 0x89

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


class AmlError(ValueError):
    """An object that AML cannot express (a bad name, an out-of-range value)."""


def name_seg(segment: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL does."""
    if not _NAME_SEG.fullmatch(segment):
        raise AmlError(f"invalid AML name segment {segment!r}")
    return segment.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""A NameString: optional '\' or '^' prefixes, then dot-separated segments."""
    prefix = b""
    while path.startswith(("\\", "^")):
        prefix += path[0].encode("ascii")
        path = path[1:]
    if not path:
        if not prefix:
            raise AmlError("empty AML name")
        return prefix + b"\x00"  # NullName after a prefix, e.g. the bare root "\"
    segments = [name_seg(s) for s in path.split(".")]
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    if len(segments) > 255:
        raise AmlError(f"AML name path too long: {path!r}")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def pkg_length(content_length: int) -> bytes:
    """PkgLength for `content_length` bytes that follow it; the length counts itself."""
    if content_length + 1 < 1 << 6:
        return bytes([content_length + 1])
    for extra in (1, 2, 3):
        total = content_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            encoded = bytes([(extra << 6) | (total & 0xF)])
            return encoded + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"AML object too large ({content_length} bytes)")


def _with_pkg_length(opcode: bytes, content: bytes) -> bytes:
    return opcode + pkg_length(len(content)) + content


def integer(value: int) -> bytes:
    if value < 0 or value >= 1 << 64:
        raise AmlError(f"AML integer out of range: {value}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == (1 << 64) - 1:
        return bytes([ONES_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32), (QWORD_PREFIX, "<Q", 1 << 64)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    data = text.encode("ascii")
    if b"\0" in data:
        raise AmlError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + data + b"\0"


def buffer(data: bytes) -> bytes:
    return _with_pkg_length(bytes([BUFFER_OP]), integer(len(data)) + data)


def package(*elements: bytes) -> bytes:
    """A Package of already-encoded elements (integers, strings, names, packages)."""
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements")
    return _with_pkg_length(bytes([PACKAGE_OP]), bytes([len(elements)]) + b"".join(elements))


def name(path: str, value: bytes) -> bytes:
    """Name(path, value): declare a named object."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    return _with_pkg_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def method(path: str, arg_count: int, *terms: bytes, serialized: bool = False) -> bytes:
    if not 0 <= arg_count <= 7:
        raise AmlError(f"a method takes 0-7 arguments, not {arg_count}")
    flags = arg_count | (serialized << 3)
    return _with_pkg_length(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0501"): three letters and four hex digits, compressed into a DWORD."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise AmlError(f"invalid EISA id {text!r}")
    vendor = 0
    for char in text[:3]:
        vendor = vendor << 5 | (ord(char) - 0x40)
    # The vendor and product halves are stored big-endian, byte by byte.
    encoded = vendor.to_bytes(2, "big") + int(text[3:], 16).to_bytes(2, "big")
    return integer(int.from_bytes(encoded, "little"))


# -- resource templates --------------------------------------------------------------


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(): a Buffer of descriptors closed by an End Tag (checksum 0: ignored)."""
    return buffer(b"".join(descriptors) + bytes([SMALL_END_TAG, 0]))


def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO(Decode16, min, max, alignment, length): a legacy port range."""
    if not (0 <= minimum <= maximum <= 0xFFFF and 0 <= alignment <= 0xFF and 0 <= length <= 0xFF):
        raise AmlError("IO descriptor field out of range")
    return struct.pack("<BBHHBB", SMALL_IO, int(decode16), minimum, maximum, alignment, length)


def _irq_mask(irqs: tuple[int, ...]) -> int:
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise AmlError(f"an IRQ descriptor holds ISA IRQs 0-15, not {irq}")
        mask |= 1 << irq
    return mask


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags(){...}: edge-triggered, active-high, exclusive ISA interrupts."""
    return struct.pack("<BH", SMALL_IRQ, _irq_mask(irqs))


def irq(*irqs: int, edge: bool = True, active_low: bool = False, shared: bool = False) -> bytes:
    """IRQ(Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared){...}."""
    flags = int(edge) | (int(active_low) << 3) | (int(shared) << 4)
    return struct.pack("<BHB", SMALL_IRQ_WITH_FLAGS, _irq_mask(irqs), flags)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite|ReadOnly, base, length)."""
    if not (0 <= base < 1 << 32 and 0 <= length < 1 << 32):
        raise AmlError("Memory32Fixed field out of range")
    return struct.pack("<BHBII", LARGE_MEMORY32_FIXED, 9, int(writable), base, length)


def interrupt(*gsis: int, consumer: bool = True, edge: bool = False, active_low: bool = False,
              shared: bool = False) -> bytes:
    """Interrupt(ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared){...}."""
    if not 1 <= len(gsis) <= 255 or not all(0 <= gsi < 1 << 32 for gsi in gsis):
        raise AmlError("Interrupt descriptor needs 1-255 interrupt numbers below 2^32")
    flags = int(consumer) | (int(edge) << 1) | (int(active_low) << 2) | (int(shared) << 3)
    body = struct.pack("<BB", flags, len(gsis)) + struct.pack(f"<{len(gsis)}I", *gsis)
    return struct.pack("<BH", LARGE_EXTENDED_INTERRUPT, len(body)) + body
