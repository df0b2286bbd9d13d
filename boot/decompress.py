"""Decompress a bzImage payload (the compressed ELF vmlinux) on the host.

The kernel's build compresses vmlinux with one of several tools and appends
the uncompressed size as a little-endian u32 (for gzip, the format's own
ISIZE field sits in the same place). Each format is recognised by the magic
bytes the kernel's own lib/decompress.c looks for. The trailer bounds the
output, so a corrupt or hostile payload cannot make pyvmm allocate more than
it announced, and the announced size is checked against a caller's limit.
"""

from __future__ import annotations

import bz2
import lzma
import mmap
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import zstandard

from vmm.errors import PyvmmError
from vmm.host_memory import ask_for_huge_pages
from vmm.layout import MiB

SIZE_TRAILER = 4

# Legacy LZ4 frame ("lz4 -l"), which the kernel uses: the magic, then blocks of
# (u32 compressed length, data), each decompressing to at most 8 MiB.
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK_SIZE = 8 * MiB


class UnsupportedPayload(PyvmmError):
    """The payload is in a format pyvmm cannot decompress on the host."""


class CorruptPayload(PyvmmError):
    """The payload claims a known format but does not decompress."""


# Each decoder returns at most `size` + 1 bytes (or raises), so that a caller can
# tell output past its limit from output that fits.
def gunzip(data: memoryview, size: int) -> bytes:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data, size + 1)


def _bzip2(data: memoryview, size: int) -> bytes:
    return bz2.BZ2Decompressor().decompress(data, max_length=size + 1)


def _lzma_alone(data: memoryview, size: int) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data, max_length=size + 1)


def unxz(data: memoryview, size: int) -> bytes:
    # The kernel's xz carries a BCJ x86 filter in front of LZMA2; liblzma reads
    # the filter chain from the stream header and undoes both.
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data, max_length=size + 1)


def unzstd(data: memoryview, size: int) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)


def _lz4_legacy(data: memoryview, size: int) -> memoryview:
    blocks = data[4:-SIZE_TRAILER]  # skip the magic; the size trailer is not a block
    # The whole kernel in one buffer made for it, in huge pages where the host has them:
    # grown block by block in 4 KiB pages it took twice its size in page faults (27,000 for
    # Debian's 51 MiB vmlinux), which cost a second or more of a boot under the nested
    # tier's emulated CPU.
    out = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ask_for_huge_pages(out)
    filled = position = 0
    while position < len(blocks):
        if position + 4 > len(blocks):
            raise CorruptPayload("truncated lz4 block header")
        (length,) = struct.unpack_from("<I", blocks, position)
        position += 4
        if length == LZ4_LEGACY_MAGIC:  # concatenated streams restart with the magic
            continue
        if length == 0 or position + length > len(blocks):
            raise CorruptPayload(f"lz4 block of {length} bytes at {position - 4:#x} is truncated")
        room = min(LZ4_LEGACY_BLOCK_SIZE, size - filled)
        if room <= 0:
            raise CorruptPayload("lz4 data continues past the announced size")
        block = lz4.block.decompress(blocks[position : position + length], uncompressed_size=room)
        out[filled : filled + len(block)] = block
        filled += len(block)
        position += length
    return memoryview(out)[:filled]  # (unmapped when the last view of it goes)


def _uncompressed(data: memoryview, size: int) -> bytes:
    return bytes(data[:-SIZE_TRAILER])


@dataclass(frozen=True)
class PayloadFormat:
    name: str
    magic: bytes
    decoder: Callable[[memoryview, int], bytes | memoryview] | None  # None: known but not decodable here


FORMATS = (
    PayloadFormat("gzip", b"\x1f\x8b", gunzip),
    PayloadFormat("gzip", b"\x1f\x9e", gunzip),  # old gzip magic, still accepted by the kernel
    PayloadFormat("bzip2", b"BZh", _bzip2),
    PayloadFormat("lzma", b"\x5d\x00\x00", _lzma_alone),
    PayloadFormat("xz", b"\xfd7zXZ\x00", unxz),
    PayloadFormat("lzo", b"\x89LZO", None),  # no well-kept Python LZO library
    PayloadFormat("lz4", struct.pack("<I", LZ4_LEGACY_MAGIC), _lz4_legacy),
    PayloadFormat("zstd", b"\x28\xb5\x2f\xfd", unzstd),
    PayloadFormat("uncompressed", b"\x7fELF", _uncompressed),
)

LIBRARY_ERRORS = (zlib.error, OSError, EOFError, lzma.LZMAError, zstandard.ZstdError,
                   lz4.block.LZ4BlockError, ValueError)


def detect_format(payload: bytes | memoryview) -> PayloadFormat | None:
    head = bytes(payload[:8])
    for fmt in FORMATS:
        if head.startswith(fmt.magic):
            return fmt
    return None


def can_decompress(payload: bytes | memoryview) -> bool:
    fmt = detect_format(payload)
    return fmt is not None and fmt.decoder is not None


def uncompressed_size(payload: bytes | memoryview) -> int:
    """The size the kernel build appended to the compressed data."""
    if len(payload) < SIZE_TRAILER + 4:
        raise CorruptPayload(f"payload too short ({len(payload)} bytes)")
    return struct.unpack_from("<I", payload, len(payload) - SIZE_TRAILER)[0]


def decompress_payload(payload: bytes | memoryview, limit: int) -> bytes | memoryview:
    """Decompress a bzImage payload to the vmlinux ELF image, refusing more than `limit` bytes."""
    payload = memoryview(payload)
    fmt = detect_format(payload)
    if fmt is None:
        raise UnsupportedPayload(f"unknown kernel compression (payload starts {bytes(payload[:4]).hex()})")
    if fmt.decoder is None:
        raise UnsupportedPayload(f"{fmt.name}-compressed kernels cannot be decompressed on the host")
    size = uncompressed_size(payload)
    if size > limit:
        raise CorruptPayload(f"the kernel decompresses to {size / MiB:.0f} MiB, more than the "
                             f"{limit / MiB:.0f} MiB it can occupy in guest memory")
    try:
        out = fmt.decoder(payload, size)
    except LIBRARY_ERRORS as err:
        raise CorruptPayload(f"corrupt {fmt.name} kernel payload: {err}") from None
    if len(out) != size:
        raise CorruptPayload(f"corrupt {fmt.name} kernel payload: decompressed to {len(out)} bytes, "
                             f"the kernel announced {size}")
    return out
