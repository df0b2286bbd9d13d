"""The kernel's LZ4 payloads: the legacy frame ("lz4 -l"), decoded block by block into one buffer.

The frame is a magic number, then blocks of (u32 compressed length, data),
each decompressing on its own to at most 8 MiB; a second magic may start a
concatenated stream. python-lz4's decoder returns every block as a new 8 MiB
object, fresh memory each time: for Debian's 51 MiB vmlinux about 12,000 page
faults, which under the nested tier's emulated CPU cost more than the
decompression itself. liblz4 (the library python-lz4 wraps, which every
Debian system has as liblz4.so.1) decodes into a buffer of the caller's, so
one 8 MiB buffer serves every block. Where that library cannot be loaded,
python-lz4 decodes.

So a chunk from `decode` lives only until the next one is asked for: hold
on to it longer only as a copy.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from vmm import cffi_prebuilt
from vmm.layout import MiB

MAGIC = 0x184C2102
BLOCK_SIZE = 8 * MiB  # the most one block decompresses to
# The most a block of BLOCK_SIZE bytes compresses to (lz4.h's LZ4_COMPRESSBOUND): the kernel's
# own decoder (lib/decompress_unlz4.c) refuses a longer block, and so does this one, before
# its length reaches a decoder that takes it as a C int (over 2 GiB it would not fit).
MAX_BLOCK_LENGTH = BLOCK_SIZE + BLOCK_SIZE // 255 + 16

LIBLZ4 = "liblz4.so.1"
DECLARATIONS = """
int LZ4_decompress_safe(const char *source, char *dest, int compressedSize, int dstCapacity);
"""


def blocks(data: memoryview) -> Iterator[memoryview]:
    """The compressed blocks of a legacy frame (`data`: from the magic to the end); ValueError
    where the framing is broken."""
    position = 4  # the magic
    while position < len(data):
        if position + 4 > len(data):
            raise ValueError("truncated lz4 block header")
        (length,) = struct.unpack_from("<I", data, position)
        position += 4
        if length == MAGIC:  # concatenated streams restart with the magic
            continue
        if length > MAX_BLOCK_LENGTH:
            raise ValueError(f"lz4 block of {length} bytes at {position - 4:#x} is longer than "
                             f"{BLOCK_SIZE} bytes compress to")
        if length == 0 or position + length > len(data):
            raise ValueError(f"lz4 block of {length} bytes at {position - 4:#x} is truncated")
        yield data[position : position + length]
        position += length


def decode(data: memoryview) -> Iterator[bytes | memoryview]:
    """Each block's output in turn: liblz4's in one reused buffer, else python-lz4's."""
    decode_block = liblz4_decoder() or python_lz4_decoder()
    for block in blocks(data):
        yield decode_block(block)


def python_lz4_decoder() -> Callable[[memoryview], bytes]:
    import lz4.block

    return lambda block: lz4.block.decompress(block, uncompressed_size=BLOCK_SIZE)


def liblz4_decoder() -> Callable[[memoryview], memoryview] | None:
    """A block decoder writing into one buffer of its own; None where liblz4 is missing."""
    # Loaded here, not at import: only an LZ4 kernel needs it.
    ffi = cffi_prebuilt.load(DECLARATIONS, "boot._lz4_prebuilt")
    try:
        library = ffi.dlopen(LIBLZ4)
    except OSError:
        return None
    output = bytearray(BLOCK_SIZE)
    destination, view = ffi.from_buffer(output), memoryview(output)

    def decode_block(block: memoryview) -> memoryview:
        # Never writes past dstCapacity, never reads past compressedSize, whatever the input.
        produced = library.LZ4_decompress_safe(ffi.from_buffer(block), destination, len(block), BLOCK_SIZE)
        if produced < 0:
            raise ValueError(f"an lz4 block of {len(block)} bytes does not decode")
        return view[:produced]

    return decode_block
