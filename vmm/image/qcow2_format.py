"""The qcow2 on-disk format: header, header extensions, table entries, snapshots.

Facts from QEMU's docs/interop/qcow2.txt. Everything is big-endian. The
file is a sequence of clusters (2**cluster_bits bytes). A two-level table
maps guest clusters to host clusters: the L1 table holds offsets of L2
tables, an L2 table holds one 64-bit entry per guest cluster. A separate
two-level table (refcount table -> refcount blocks) counts how many
references each host cluster has; 0 means free.

This module only parses and builds bytes; it validates every field it reads
against the file size, so the rest of the library can trust a `Header`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmm.image.base import CorruptImageError, UnsupportedImageError

MAGIC = b"QFI\xfb"

# Header layout, shared by versions 2 and 3 (version 3 appends more fields).
_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3_EXTRA = struct.Struct(">QQQII")  # 32 bytes: features, refcount order, header length
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
V3_HEADER_LENGTH_WITH_COMPRESSION = 112

# Field offsets we update in place.
OFFSET_SIZE = 24  # size u64, then crypt_method u32, l1_size u32, l1_table_offset u64
OFFSET_REFCOUNT_TABLE = 48  # refcount_table_offset u64, refcount_table_clusters u32
OFFSET_INCOMPATIBLE = 72
OFFSET_AUTOCLEAR = 88

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# Limits QEMU applies too; they keep a malformed header from making us
# allocate gigabytes.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_BACKING_NAME = 1023

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Table entries.
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9..55: a host offset
OFLAG_COPIED = 1 << 63  # refcount is exactly 1: may be written in place
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # (version 3) the cluster reads as zeros
L1E_RESERVED = 0x7F00_0000_0000_01FF
L2E_RESERVED = 0x3F00_0000_0000_01FE
REFT_RESERVED = 0x0000_0000_0000_01FF

# What a guest cluster's L2 entry says (see `cluster_kind`):
#   UNALLOCATED  read from the backing image (zeros if there is none)
#   ZERO         (version 3) reads as zeros, whatever the backing says
#   NORMAL       host cluster at the given offset; with the COPIED flag its
#                refcount is 1 and it may be written in place, without it
#                (shared with an internal snapshot) a write copies it first
#   COMPRESSED   a compressed cluster at a byte offset; writes copy it out
UNALLOCATED, ZERO, NORMAL, COMPRESSED = range(4)

_EXT_HEADER = struct.Struct(">II")


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    # Bitmaps extension: (number of bitmaps, directory size, directory offset).
    bitmaps: tuple[int, int, int] | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    def pack(self) -> bytes:
        """The fixed header fields (no extensions, no backing name)."""
        raw = _V2_HEADER.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset,
        )
        if self.version >= 3:
            raw += _V3_EXTRA.pack(
                self.incompatible_features, self.compatible_features, self.autoclear_features,
                self.refcount_order, self.header_length,
            )
            if self.header_length > V3_HEADER_LENGTH:
                raw += bytes([self.compression_type]) + bytes(self.header_length - 105)
        return raw


def l2_entries_bits(cluster_bits: int) -> int:
    """log2 of the number of entries in one L2 table (8-byte entries)."""
    return cluster_bits - 3


def l1_entries_needed(size: int, cluster_bits: int) -> int:
    per_l1_entry = 1 << (cluster_bits + l2_entries_bits(cluster_bits))
    return -(-size // per_l1_entry)


def cluster_kind(entry: int) -> int:
    """UNALLOCATED, ZERO, NORMAL or COMPRESSED: what an L2 entry says about its cluster."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & OFLAG_ZERO:
        return ZERO
    return NORMAL if entry & OFFSET_MASK else UNALLOCATED


def compressed_shift(cluster_bits: int) -> int:
    """Bit position of the sector-count field of a compressed L2 entry."""
    return 62 - (cluster_bits - 8)


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int, int]:
    """(host byte offset, number of 512-byte sectors touched, bytes to read) of a compressed entry."""
    shift = compressed_shift(cluster_bits)
    host = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return host, sectors, sectors * 512 - (host & 511)


def encode_compressed(host: int, length: int, cluster_bits: int) -> int:
    sectors = ((host + length - 1) >> 9) - (host >> 9) + 1
    return OFLAG_COMPRESSED | ((sectors - 1) << compressed_shift(cluster_bits)) | host


def parse_header(name: str, first_cluster: bytes, file_size: int) -> Header:
    """Parse and validate the header in the image's first bytes (at least one cluster if the file has it)."""

    def corrupt(msg: str) -> CorruptImageError:
        return CorruptImageError(f"{name}: invalid qcow2 header: {msg}")

    if len(first_cluster) < V2_HEADER_LENGTH or first_cluster[:4] != MAGIC:
        raise corrupt("not a qcow2 image (bad magic or truncated)")
    fields = _V2_HEADER.unpack_from(first_cluster)
    hdr = Header(*fields[1:])
    if hdr.version not in (2, 3):
        raise UnsupportedImageError(f"{name}: qcow2 version {hdr.version} is not supported")
    if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
        raise corrupt(f"cluster_bits {hdr.cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cs = hdr.cluster_size
    if hdr.version >= 3:
        if len(first_cluster) < V3_HEADER_LENGTH:
            raise corrupt("truncated version 3 header")
        (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
         hdr.refcount_order, hdr.header_length) = _V3_EXTRA.unpack_from(first_cluster, V2_HEADER_LENGTH)
        if hdr.header_length < V3_HEADER_LENGTH or hdr.header_length % 8:
            raise corrupt(f"header_length {hdr.header_length} is invalid")
        if hdr.header_length > cs or hdr.header_length > len(first_cluster):
            raise corrupt("header_length larger than the first cluster")
        if hdr.header_length > V3_HEADER_LENGTH:
            hdr.compression_type = first_cluster[V3_HEADER_LENGTH]
    if len(first_cluster) < min(cs, file_size):
        raise corrupt("truncated first cluster")
    if hdr.refcount_order > 6:
        raise corrupt(f"refcount_order {hdr.refcount_order} is larger than 6")
    if hdr.crypt_method:
        raise UnsupportedImageError(f"{name}: encrypted qcow2 images are not supported")
    _parse_extensions(name, hdr, first_cluster)
    _check_features(name, hdr)
    _check_tables(name, hdr, file_size)
    return hdr


def _parse_extensions(name: str, hdr: Header, data: bytes) -> None:
    cs = hdr.cluster_size
    end = min(cs, len(data))
    if hdr.backing_file_offset:
        if hdr.backing_file_size > MAX_BACKING_NAME or hdr.backing_file_size == 0:
            raise CorruptImageError(f"{name}: backing file name length {hdr.backing_file_size} is invalid")
        if hdr.backing_file_offset + hdr.backing_file_size > end:
            raise CorruptImageError(f"{name}: backing file name lies outside the header cluster")
        raw = data[hdr.backing_file_offset : hdr.backing_file_offset + hdr.backing_file_size]
        if b"\0" in raw:  # no file can have that name; the OS would refuse it
            raise CorruptImageError(f"{name}: backing file name holds a NUL byte")
        hdr.backing_file = raw.decode("utf-8", errors="replace")
        end = min(end, hdr.backing_file_offset)
    pos = hdr.header_length
    while pos + _EXT_HEADER.size <= end:
        ext_type, ext_len = _EXT_HEADER.unpack_from(data, pos)
        pos += _EXT_HEADER.size
        if ext_type == EXT_END:
            break
        if pos + ext_len > end:
            raise CorruptImageError(f"{name}: header extension {ext_type:#x} runs past the header cluster")
        body = data[pos : pos + ext_len]
        if ext_type == EXT_BACKING_FORMAT:
            hdr.backing_format = body.decode("ascii", errors="replace")
        elif ext_type == EXT_FEATURE_NAMES:
            for i in range(0, len(body) - 47, 48):
                kind, bit = body[i], body[i + 1]
                hdr.feature_names[(kind, bit)] = body[i + 2 : i + 48].split(b"\0")[0].decode(
                    "ascii", errors="replace")
        elif ext_type == EXT_BITMAPS and ext_len >= 24:
            nb, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", body)
            hdr.bitmaps = (nb, dir_size, dir_offset)
        elif ext_type == EXT_CRYPTO:
            raise UnsupportedImageError(f"{name}: encrypted qcow2 images are not supported")
        elif ext_type == EXT_DATA_FILE:
            raise UnsupportedImageError(f"{name}: qcow2 images with an external data file are not supported")
        pos += (ext_len + 7) & ~7


def _check_features(name: str, hdr: Header) -> None:
    bits = hdr.incompatible_features
    if bits & INCOMPAT_DATA_FILE:
        raise UnsupportedImageError(f"{name}: qcow2 images with an external data file are not supported")
    if bits & INCOMPAT_EXTL2:
        raise UnsupportedImageError(f"{name}: qcow2 images with extended L2 entries (subclusters) are not supported")
    unknown = bits & ~KNOWN_INCOMPAT
    if unknown:
        names = []
        for bit in range(64):
            if unknown >> bit & 1:
                names.append(hdr.feature_names.get((0, bit), f"bit {bit}"))
        raise UnsupportedImageError(
            f"{name}: unsupported incompatible qcow2 feature(s): {', '.join(names)}")
    if hdr.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedImageError(f"{name}: unknown compression type {hdr.compression_type}")
    has_bit = bool(bits & INCOMPAT_COMPRESSION)
    if has_bit != (hdr.compression_type != COMPRESSION_ZLIB):
        raise CorruptImageError(f"{name}: compression type field and feature bit disagree")
    if hdr.version == 2 and hdr.refcount_order != 4:
        raise CorruptImageError(f"{name}: version 2 images have 16-bit refcounts")


def _check_tables(name: str, hdr: Header, file_size: int) -> None:
    cs = hdr.cluster_size

    def within(offset: int, length: int, what: str) -> None:
        if offset % cs:
            raise CorruptImageError(f"{name}: {what} offset {offset:#x} is not cluster aligned")
        if offset + length > file_size or (length and offset == 0):
            raise CorruptImageError(f"{name}: {what} at {offset:#x} (+{length}) lies outside the file")

    if hdr.size >= 1 << 62:
        raise CorruptImageError(f"{name}: image size {hdr.size} is too large")
    if hdr.l1_size * 8 > MAX_L1_BYTES:
        raise CorruptImageError(f"{name}: L1 table is too large ({hdr.l1_size} entries)")
    if hdr.l1_size < l1_entries_needed(hdr.size, hdr.cluster_bits):
        raise CorruptImageError(f"{name}: L1 table is too small for the image size")
    within(hdr.l1_table_offset, hdr.l1_size * 8, "L1 table")
    if hdr.refcount_table_clusters == 0:
        raise CorruptImageError(f"{name}: image has no refcount table")
    if hdr.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise CorruptImageError(f"{name}: refcount table is too large")
    within(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, "refcount table")
    if hdr.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImageError(f"{name}: too many snapshots ({hdr.nb_snapshots})")
    if hdr.nb_snapshots:
        within(hdr.snapshots_offset, 40 * hdr.nb_snapshots, "snapshot table")


@dataclass
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None
    disk_size: int | None


_SNAPSHOT = struct.Struct(">QIHHIIQII")  # 40 bytes


def parse_snapshots(name: str, hdr: Header, table: bytes, file_size: int) -> tuple[list[Snapshot], int]:
    """Parse the snapshot table; returns the snapshots and the table's length in bytes."""
    snapshots = []
    pos = 0
    for _ in range(hdr.nb_snapshots):
        if pos + _SNAPSHOT.size > len(table):
            raise CorruptImageError(f"{name}: snapshot table is truncated")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, clock, vm_state,
         extra_len) = _SNAPSHOT.unpack_from(table, pos)
        pos += _SNAPSHOT.size
        if extra_len > 1024 or pos + extra_len + id_len + name_len > len(table):
            raise CorruptImageError(f"{name}: snapshot table entry is truncated")
        extra = table[pos : pos + extra_len]
        pos += extra_len
        ident = table[pos : pos + id_len].decode("utf-8", errors="replace")
        pos += id_len
        tag = table[pos : pos + name_len].decode("utf-8", errors="replace")
        pos += name_len
        pos = (pos + 7) & ~7
        if l1_size * 8 > MAX_L1_BYTES or l1_off % hdr.cluster_size or l1_off + l1_size * 8 > file_size:
            raise CorruptImageError(f"{name}: snapshot {tag!r} has an invalid L1 table")
        vm_state_large, disk_size, icount = None, None, None
        if len(extra) >= 8:
            vm_state_large = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            icount = struct.unpack_from(">q", extra, 16)[0]
            if icount < 0:
                icount = None
        snapshots.append(Snapshot(
            id=ident, name=tag, l1_table_offset=l1_off, l1_size=l1_size, date_sec=date_sec,
            date_nsec=date_nsec, vm_clock_nsec=clock,
            vm_state_size=vm_state_large if vm_state_large is not None else vm_state,
            icount=icount, disk_size=disk_size,
        ))
    return snapshots, pos


def header_extensions(backing_format: str | None) -> bytes:
    """The extension area written after the header of a new image."""
    out = b""
    if backing_format:
        body = backing_format.encode()
        out += _EXT_HEADER.pack(EXT_BACKING_FORMAT, len(body)) + body + bytes(-len(body) % 8)
    return out + _EXT_HEADER.pack(EXT_END, 0)
