"""Decompress a bzImage payload (the compressed ELF vmlinux) on the host, in chunks.

The kernel's build compresses vmlinux with one of several tools and appends
the uncompressed size as a little-endian u32 (for gzip, the format's own
ISIZE field sits in the same place). Each format is recognised by the magic
bytes the kernel's own lib/decompress.c looks for. The trailer bounds the
output, so a corrupt or hostile payload cannot make pyvmm allocate more than
it announced, and the announced size is checked against a caller's limit.

The output comes as chunks of at most 8 MiB, in order, which the ELF loader
(boot/vmlinux.py) copies straight to the segments' places in guest RAM: no
buffer of pyvmm's holds the whole vmlinux (51 MiB for Debian's LZ4 kernel).
A chunk lives only until the next is asked for (the LZ4 decoder writes every
block into the same buffer, boot/lz4_legacy.py): keep one longer as a copy.
Such a buffer cost a second memory's worth of page faults and a copy, which
under the nested tier's emulated CPU was 0.3-1 s of every boot. The xz,
lzma and zstd decoders keep their own window of past output, as large as
the stream's header asks (the kernel's build asks 32 MiB of xz, and of zstd
-22 128 MiB, so there zstd's window holds the whole image); zstandard refuses
a window over 128 MiB.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from boot import lz4_legacy
from vmm.errors import PyvmmError
from vmm.layout import MiB

if TYPE_CHECKING:
    import bz2
    import lzma

# Each decoder imports its library when it runs: a kernel needs one of them, and
# importing all four (zstandard's the dearest) cost every boot 4.5 ms here.

SIZE_TRAILER = 4
CHUNK_SIZE = 8 * MiB  # the most any decoder produces at a time

# The most memory liblzma may take for a stream's dictionary: the kernel's build asks
# for 64 MiB (lzma -9) or 32 MiB (xz); a header asking for 4 GiB is refused, not obeyed.
LZMA_MEMORY_LIMIT = 256 * MiB


class UnsupportedPayload(PyvmmError):
    """The payload is in a format pyvmm cannot decompress on the host."""


class CorruptPayload(PyvmmError):
    """The payload claims a known format but does not decompress."""


# Each decoder yields the output in chunks of at most CHUNK_SIZE bytes, so that
# the caller can stop one chunk past the announced size.
def gunzip(data: memoryview) -> Iterator[bytes]:
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    pending: bytes | memoryview = data
    while not decompressor.eof:
        chunk = decompressor.decompress(pending, CHUNK_SIZE)
        pending = decompressor.unconsumed_tail
        if not chunk:
            raise EOFError("the data ends before its end-of-stream marker")
        yield chunk


def _drain(decompressor: bz2.BZ2Decompressor | lzma.LZMADecompressor, data: memoryview) -> Iterator[bytes]:
    """bz2's and lzma's decompressors: the same calls, `max_length` bounding each."""
    chunk = decompressor.decompress(data, max_length=CHUNK_SIZE)
    while not decompressor.eof:
        if not chunk and decompressor.needs_input:
            raise EOFError("the data ends before its end-of-stream marker")
        yield chunk
        chunk = decompressor.decompress(b"", max_length=CHUNK_SIZE)
    if chunk:
        yield chunk


def _bzip2(data: memoryview) -> Iterator[bytes]:
    import bz2

    return _drain(bz2.BZ2Decompressor(), data)


def _lzma_alone(data: memoryview) -> Iterator[bytes]:
    import lzma

    return _drain(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=LZMA_MEMORY_LIMIT), data)


def unxz(data: memoryview) -> Iterator[bytes]:
    import lzma

    # The kernel's xz carries a BCJ x86 filter in front of LZMA2; liblzma reads
    # the filter chain from the stream header and undoes both.
    return _drain(lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMORY_LIMIT), data)


def unzstd(data: memoryview) -> Iterator[bytes]:
    import zstandard

    # read_to_iter ends quietly where the data does; the frame's own size (zstd writes it
    # unless told not to) tells a truncated one.
    announced = zstandard.get_frame_parameters(data).content_size
    produced = 0
    for chunk in zstandard.ZstdDecompressor().read_to_iter(data, write_size=CHUNK_SIZE):
        produced += len(chunk)
        yield chunk
    if announced != zstandard.CONTENTSIZE_UNKNOWN and produced != announced:
        raise EOFError("the data ends before its end-of-stream marker")


def _lz4(data: memoryview) -> Iterator[bytes | memoryview]:
    return lz4_legacy.decode(data[:-SIZE_TRAILER])  # the size trailer is not a block


def _uncompressed(data: memoryview) -> Iterator[memoryview]:
    data = data[:-SIZE_TRAILER]
    for start in range(0, len(data), CHUNK_SIZE):
        yield data[start : start + CHUNK_SIZE]


class PayloadFormat(NamedTuple):
    name: str
    magic: bytes
    decoder: Callable[[memoryview], Iterator[bytes | memoryview]] | None  # None: known but not decodable here


FORMATS = (
    PayloadFormat("gzip", b"\x1f\x8b", gunzip),
    PayloadFormat("gzip", b"\x1f\x9e", gunzip),  # old gzip magic, still accepted by the kernel
    PayloadFormat("bzip2", b"BZh", _bzip2),
    PayloadFormat("lzma", b"\x5d\x00\x00", _lzma_alone),
    PayloadFormat("xz", b"\xfd7zXZ\x00", unxz),
    PayloadFormat("lzo", b"\x89LZO", None),  # no well-kept Python LZO library
    PayloadFormat("lz4", struct.pack("<I", lz4_legacy.MAGIC), _lz4),
    PayloadFormat("zstd", b"\x28\xb5\x2f\xfd", unzstd),
    PayloadFormat("uncompressed", b"\x7fELF", _uncompressed),
)


def data_errors() -> tuple[type[Exception], ...]:
    """What the decoders raise for data that does not decode: their libraries' errors (of
    those imported: a library not imported raised nothing), and EOFError and ValueError."""
    errors = [zlib.error, OSError, EOFError, ValueError]
    for module, name in (("lzma", "LZMAError"), ("zstandard", "ZstdError"), ("lz4.block", "LZ4BlockError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


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


def decompressed_chunks(payload: bytes | memoryview, limit: int) -> Iterator[bytes | memoryview]:
    """The vmlinux ELF image a bzImage payload holds, in order, in chunks of at most 8 MiB
    (each valid until the next is asked for); refuses more than `limit` bytes, and raises
    CorruptPayload (once the chunks before it are out) where the data is bad or ends off the
    size the kernel announced."""
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
    return _checked(fmt.name, fmt.decoder(payload), size)


def _checked(name: str, chunks: Iterator[bytes | memoryview], size: int) -> Iterator[bytes | memoryview]:
    produced = 0
    try:
        for chunk in chunks:
            produced += len(chunk)
            if produced > size:
                raise CorruptPayload(f"corrupt {name} kernel payload: it continues past the "
                                     f"{size} bytes the kernel announced")
            yield chunk
    except data_errors() as err:
        raise CorruptPayload(f"corrupt {name} kernel payload: {err}") from None
    if produced != size:
        raise CorruptPayload(f"corrupt {name} kernel payload: decompressed to {produced} bytes, "
                             f"the kernel announced {size}")
