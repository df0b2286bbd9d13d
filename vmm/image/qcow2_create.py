"""Lay out a new, empty qcow2 image.

The layout is QEMU's: header (with extensions and the backing file name) in
cluster 0, then the refcount table, the refcount blocks counting these
first clusters, then the L1 table. For a 64 KiB-cluster image that is
clusters 0, 1, 2 and 3.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vmm.errors import PyvmmError
from vmm.image.qcow2_format import (
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    INCOMPAT_COMPRESSION,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MIN_CLUSTER_BITS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH_WITH_COMPRESSION,
    Header,
    header_extensions,
    l1_entries_needed,
)
from vmm.image.qcow2_tables import RefcountBlock


@dataclass
class Qcow2Options:
    cluster_size: int = 65536
    version: int = 3
    refcount_bits: int = 16
    compression_type: int = COMPRESSION_ZLIB

    def describe(self) -> str:
        compat = "1.1" if self.version >= 3 else "0.10"
        return (f"cluster_size={self.cluster_size} compression_type="
                f"{COMPRESSION_NAMES[self.compression_type]} compat={compat} "
                f"refcount_bits={self.refcount_bits}")


def parse_qcow2_options(text: str | None) -> Qcow2Options:
    """Parse `-o key=value,...` as qemu-img accepts it for qcow2."""
    from vmm.image.sizes import parse_size

    opts = Qcow2Options()
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise PyvmmError(f"invalid option {item!r}: expected key=value")
        if key == "cluster_size":
            opts.cluster_size = parse_size(value, "cluster size")
        elif key == "compat":
            if value in ("0.10", "v2"):
                opts.version = 2
            elif value in ("1.1", "v3"):
                opts.version = 3
            else:
                raise PyvmmError(f"invalid compat {value!r}: expected 0.10 or 1.1")
        elif key == "refcount_bits":
            if not value.isdigit() or int(value) not in (1, 2, 4, 8, 16, 32, 64):
                raise PyvmmError(f"invalid refcount_bits {value!r}: expected a power of two up to 64")
            opts.refcount_bits = int(value)
        elif key == "compression_type":
            names = {v: k for k, v in COMPRESSION_NAMES.items()}
            if value not in names:
                raise PyvmmError(f"invalid compression_type {value!r}: expected zlib or zstd")
            opts.compression_type = names[value]
        elif key in ("lazy_refcounts", "preallocation", "extended_l2") and value in ("off", "false"):
            pass
        else:
            raise PyvmmError(f"unsupported qcow2 option {item!r}")
    bits = opts.cluster_size.bit_length() - 1
    if opts.cluster_size != 1 << bits or not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise PyvmmError(f"cluster size must be a power of two between 512 and 2M, "
                         f"not {opts.cluster_size}")
    if opts.version == 2 and opts.refcount_bits != 16:
        raise PyvmmError("compat=0.10 images only support refcount_bits=16")
    if opts.version == 2 and opts.compression_type != COMPRESSION_ZLIB:
        raise PyvmmError("compat=0.10 images only support compression_type=zlib")
    return opts


def build_qcow2(fd: int, size: int, opts: Qcow2Options, backing_file: str | None = None,
                backing_format: str | None = None) -> None:
    """Write a new empty image into the (empty) file `fd`."""
    cb = opts.cluster_size.bit_length() - 1
    cs = opts.cluster_size
    l1_size = l1_entries_needed(size, cb)
    if l1_size * 8 > MAX_L1_BYTES:
        raise PyvmmError(f"image size {size} is too large for cluster size {cs}")
    refcount_order = opts.refcount_bits.bit_length() - 1
    per_refblock = cs * 8 // opts.refcount_bits
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    refblocks = reftable_clusters = 1
    while True:  # the first clusters must count themselves
        used = 1 + reftable_clusters + refblocks + l1_clusters
        need_blocks = -(-used // per_refblock)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (refblocks, reftable_clusters):
            break
        refblocks, reftable_clusters = need_blocks, need_table
    reftable_at = 1
    refblocks_at = reftable_at + reftable_clusters
    l1_at = refblocks_at + refblocks

    hdr = Header(
        version=opts.version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
        size=size, crypt_method=0, l1_size=l1_size, l1_table_offset=l1_at * cs,
        refcount_table_offset=reftable_at * cs, refcount_table_clusters=reftable_clusters,
        nb_snapshots=0, snapshots_offset=0, refcount_order=refcount_order,
        header_length=V3_HEADER_LENGTH_WITH_COMPRESSION if opts.version >= 3 else V2_HEADER_LENGTH,
        compression_type=opts.compression_type,
        incompatible_features=INCOMPAT_COMPRESSION if opts.compression_type else 0,
    )
    extensions = header_extensions(backing_format if backing_file else None)
    name = (backing_file or "").encode()
    if len(name) > MAX_BACKING_NAME:
        raise PyvmmError(f"backing file name is longer than {MAX_BACKING_NAME} bytes")
    if backing_file:
        hdr.backing_file_offset = hdr.header_length + len(extensions)
        hdr.backing_file_size = len(name)
    first = hdr.pack() + extensions + name
    if len(first) > cs:
        raise PyvmmError("the backing file name does not fit in the header cluster; "
                         "use a bigger cluster size")

    image = bytearray(used * cs)
    image[: len(first)] = first
    for k in range(refblocks):
        image[(reftable_at * cs) + 8 * k : (reftable_at * cs) + 8 * k + 8] = (
            ((refblocks_at + k) * cs).to_bytes(8, "big"))
        block = RefcountBlock(bytes(cs), refcount_order)
        for i in range(min(per_refblock, used - k * per_refblock)):
            block.set(i, 1)
        image[(refblocks_at + k) * cs : (refblocks_at + k + 1) * cs] = block.to_bytes()
    view = memoryview(image)
    done = 0
    while done < len(image):
        done += os.pwrite(fd, view[done:], done)
    os.fsync(fd)
