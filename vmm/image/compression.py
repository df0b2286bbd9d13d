"""Compressed qcow2 clusters: raw deflate (the default) and zstd.

QEMU compresses a cluster with raw deflate (no zlib header) and a 4 KiB
window (wbits -12), or, when the header's compression type says so, as one
zstd frame. The stored bytes are padded to a 512-byte sector, so a
decompressor must stop once it has produced one cluster and ignore what
follows.
"""

from __future__ import annotations

import zlib

from vmm.image.base import CorruptImageError, UnsupportedImageError
from vmm.image.qcow2_format import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise UnsupportedImageError(
            "this image uses zstd compression; install the 'zstandard' Python package"
        ) from None
    return zstandard


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int, where: str) -> bytes:
    """Decompress one cluster; anything but exactly `cluster_size` bytes is corruption."""
    try:
        if compression_type == COMPRESSION_ZLIB:
            # wbits -15 accepts any window size up to 32 KiB, QEMU's -12 included.
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            out = _zstd().ZstdDecompressor().decompressobj().decompress(data)
        else:
            raise UnsupportedImageError(f"{where}: unknown compression type {compression_type}")
    except (zlib.error, ValueError) as err:
        raise CorruptImageError(f"{where}: compressed cluster does not decompress ({err})") from None
    except Exception as err:
        if type(err).__name__ == "ZstdError":
            raise CorruptImageError(f"{where}: compressed cluster does not decompress ({err})") from None
        raise
    if len(out) < cluster_size:
        raise CorruptImageError(f"{where}: compressed cluster decompresses to {len(out)} bytes, "
                                f"not {cluster_size}")
    return out[:cluster_size]


def compress_cluster(data: bytes, compression_type: int) -> bytes:
    if compression_type == COMPRESSION_ZLIB:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return compressor.compress(data) + compressor.flush()
    if compression_type == COMPRESSION_ZSTD:
        return _zstd().ZstdCompressor().compress(data)
    raise UnsupportedImageError(f"unknown compression type {compression_type}")
