"""qcow2 images: the image object and its public block-device API.

One job: `Qcow2Image` opens a qcow2 file (header, L1 table, refcount table,
snapshot list), owns the file descriptor, the lock and the table caches,
reads guest data (`read`, `map`, through the backing chain), and offers the
public write/write_zeroes/discard/flush/resize/close methods of `BlockDevice`.
The work behind writes lives in two mixins:

    qcow2_write.py      where a write goes (in place or copy-on-write),
                        zeroing, growing the L1 table, and the ordered
                        metadata commit
    qcow2_refcounts.py  refcounts: allocating, freeing, growing the table

The crash-consistency rules of writes are spelled out in qcow2_write.py;
the public methods here only take the lock, check the request and call in
there. This module's own ordering rule: `flush`, `close` and
`set_incompatible_bits` commit all cached metadata before returning or
before the header's feature bits change, and `abandon` (a simulated crash,
for tests) writes nothing. What an L2 entry can say is described in
qcow2_format.py.

Malformed metadata raises `CorruptImageError` before anything is written.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from array import array
from collections import OrderedDict

from vmm.image.base import (
    BlockDevice,
    CorruptImageError,
    Extent,
    Hole,
    ImageError,
)
from vmm.image.compression import decompress_cluster
from vmm.image.qcow2_format import (
    COMPRESSED,
    MAX_SNAPSHOT_TABLE_BYTES,
    NORMAL,
    OFFSET_INCOMPATIBLE,
    OFFSET_MASK,
    REFT_RESERVED,
    UNALLOCATED,
    ZERO,
    Header,
    cluster_kind,
    decode_compressed,
    parse_header,
    parse_snapshots,
)
from vmm.image.qcow2_refcounts import Qcow2Refcounts
from vmm.image.qcow2_tables import RefcountBlock, table_from_bytes
from vmm.image.qcow2_write import Qcow2Writer

# Bound on cached metadata. Dirty tables are never evicted (qcow2_write.py
# commits them once there are too many).
_CACHE_BYTES = 32 << 20
_IOV_MAX = 1024


class Qcow2Image(Qcow2Writer, Qcow2Refcounts, BlockDevice):
    """An open qcow2 file. All state, the mixins' included, is set up in `_open`."""

    format_name = "qcow2"

    def __init__(self, path: str, readonly: bool = True, *, repair: bool = False) -> None:
        """Open `path`. The backing image (if any) is attached by the opener (see open.py).

        `repair` lets `check -r` open an image marked corrupt or dirty for writing.
        """
        self.filename = path
        self.readonly = readonly
        self.backing: BlockDevice | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            if not readonly:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ImageError(f"{path}: image is in use by another pyvmm process") from None
            self._open(repair)
        except BaseException:
            os.close(self._fd)
            raise

    # --- opening ----------------------------------------------------------------

    def _open(self, repair: bool) -> None:
        self._file_size = os.fstat(self._fd).st_size
        probe = os.pread(self._fd, 1 << 21, 0)  # the largest possible cluster
        hdr = parse_header(self.filename, probe, self._file_size)
        self.header: Header = hdr
        if not self.readonly and not repair:
            if hdr.corrupt:
                raise CorruptImageError(
                    f"{self.filename}: image is marked corrupt; open it read-only or repair it "
                    "with `pyvmm img check -r all`")
        self.size = hdr.size
        self.cluster_bits = cb = hdr.cluster_bits
        self.cluster_size = cs = 1 << cb
        self._cmask = cs - 1
        self._l2_bits = cb - 3
        self._l2_mask = (1 << self._l2_bits) - 1
        self._rb_bits = cb + 3 - hdr.refcount_order  # log2(entries per refcount block)
        self._rb_mask = (1 << self._rb_bits) - 1
        self.refcount_max = (1 << (1 << hdr.refcount_order)) - 1

        self._l1 = table_from_bytes(self._pread(hdr.l1_table_offset, hdr.l1_size * 8, "L1 table"))
        self._l1_offset = hdr.l1_table_offset
        self._l1_dirty: set[int] = set()
        self._reftable_offset = hdr.refcount_table_offset
        self._reftable_clusters = hdr.refcount_table_clusters
        self._reftable = table_from_bytes(
            self._pread(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, "refcount table"))
        self._reftable_dirty: set[int] = set()
        self.snapshots = []
        self._snapshot_table_len = 0
        if hdr.nb_snapshots:
            length = min(self._file_size - hdr.snapshots_offset, MAX_SNAPSHOT_TABLE_BYTES)
            table = os.pread(self._fd, length, hdr.snapshots_offset)
            self.snapshots, self._snapshot_table_len = parse_snapshots(
                self.filename, hdr, table, self._file_size)

        # Clusters holding fixed metadata: never a data or table cluster.
        self._fixed_clusters: set[int] = {0}
        self._add_range(self._fixed_clusters, hdr.l1_table_offset, hdr.l1_size * 8)
        self._add_range(self._fixed_clusters, hdr.refcount_table_offset,
                        hdr.refcount_table_clusters * cs)
        self._add_range(self._fixed_clusters, hdr.snapshots_offset, self._snapshot_table_len)
        for snap in self.snapshots:
            self._add_range(self._fixed_clusters, snap.l1_table_offset, snap.l1_size * 8)
        self._l2_clusters = {(e & OFFSET_MASK) >> cb for e in self._l1 if e & OFFSET_MASK}
        self._refblock_clusters = {(e & ~REFT_RESERVED) >> cb for e in self._reftable if e}

        self._l2_cache: OrderedDict[int, array] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._rb_cache: OrderedDict[int, RefcountBlock] = OrderedDict()
        self._rb_dirty: set[int] = set()
        self._cache_limit = max(16, _CACHE_BYTES // cs)
        # Allocation and freeing (qcow2_refcounts.py).
        self._pending_frees: list[int] = []  # cluster indices to decrement after the next commit
        self._reusable: list[int] = []  # clusters freed on disk in this session
        self._next_free = -(-self._file_size // cs)
        self._scan_pos, self._scan_end = 1, self._next_free  # free clusters inside the file
        # Write path and commit (qcow2_write.py).
        self._data_dirty = False
        self._modified = False
        self._compressed_pos: int | None = None  # where the next compressed cluster may start
        self._compressed_end = 0  # end of the host clusters reserved for compressed data
        self._last_decompressed: tuple[int, bytes] | None = None

    def _add_range(self, clusters: set[int], offset: int, length: int) -> None:
        if length > 0:
            first, last = offset >> self.cluster_bits, (offset + length - 1) >> self.cluster_bits
            clusters.update(range(first, last + 1))

    def _move_fixed_clusters(self, old_first: int, old_count: int, new_first: int,
                             new_count: int) -> None:
        """A fixed table (L1, refcount table) moved: its old clusters are no longer fixed."""
        self._fixed_clusters.difference_update(range(old_first, old_first + old_count))
        self._fixed_clusters.update(range(new_first, new_first + new_count))

    def _is_metadata_cluster(self, index: int) -> bool:
        """Host cluster `index` holds metadata (never to be used or handed out as data)."""
        return (index in self._fixed_clusters or index in self._l2_clusters
                or index in self._refblock_clusters)

    # --- low-level I/O ---------------------------------------------------------------

    def _pread(self, offset: int, length: int, what: str) -> bytes:
        data = os.pread(self._fd, length, offset) if length else b""
        if len(data) != length:
            raise CorruptImageError(f"{self.filename}: {what} at {offset:#x} lies outside the file")
        return data

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        self._file_size = max(self._file_size, offset + len(view))

    def _pwritev(self, offset: int, buffers: list) -> None:
        for start in range(0, len(buffers), _IOV_MAX):
            chunk = buffers[start : start + _IOV_MAX]
            length = sum(len(b) for b in chunk)
            done = os.pwritev(self._fd, chunk, offset)
            if done != length:  # rare short write: finish the rest one by one
                self._pwrite(offset, b"".join(bytes(b) for b in chunk))
            offset += length
        self._file_size = max(self._file_size, offset)

    def _sync(self) -> None:
        os.fdatasync(self._fd)

    # --- table access ---------------------------------------------------------------

    def _check_table_offset(self, offset: int, what: str) -> None:
        cluster = offset >> self.cluster_bits
        if offset & self._cmask:
            raise CorruptImageError(f"{self.filename}: {what} offset {offset:#x} is not cluster aligned")
        if offset + self.cluster_size > self._file_size:
            raise CorruptImageError(f"{self.filename}: {what} at {offset:#x} lies outside the file")
        if cluster in self._fixed_clusters:
            raise CorruptImageError(f"{self.filename}: {what} at {offset:#x} overlaps other metadata")

    def _get_l2(self, offset: int) -> array:
        return self._cached_table(self._l2_cache, self._l2_dirty, offset, self._load_l2)

    def _load_l2(self, offset: int) -> array:
        self._check_table_offset(offset, "L2 table")
        if offset >> self.cluster_bits in self._refblock_clusters:
            raise CorruptImageError(f"{self.filename}: L2 table at {offset:#x} overlaps a refcount block")
        return table_from_bytes(self._pread(offset, self.cluster_size, "L2 table"))

    def _cached_table(self, cache: OrderedDict, dirty: set[int], offset: int, load):
        """The table at `offset` from `cache` (least recently used first), loaded on a miss."""
        table = cache.get(offset)
        if table is not None:
            cache.move_to_end(offset)
            return table
        table = load(offset)
        cache[offset] = table
        self._evict(cache, dirty)
        return table

    def _evict(self, cache: OrderedDict, dirty: set[int]) -> None:
        if len(cache) <= self._cache_limit:
            return
        for key in list(cache):
            if len(cache) <= self._cache_limit:
                break
            if key not in dirty:
                del cache[key]

    def _l2_entry(self, vcluster: int) -> int:
        l1_entry = self._l1[vcluster >> self._l2_bits]
        l2_offset = l1_entry & OFFSET_MASK
        if not l2_offset:
            return 0
        return self._get_l2(l2_offset)[vcluster & self._l2_mask]

    # --- reading ---------------------------------------------------------------

    def _read_layer(self, out: memoryview, out_offset: int, offset: int, length: int) -> list[Hole]:
        with self._lock:
            return self._read_layer_locked(out, out_offset, offset, length)

    def _read_layer_locked(self, out: memoryview, out_offset: int, offset: int,
                           length: int) -> list[Hole]:
        holes: list[Hole] = []
        cb, cs = self.cluster_bits, self.cluster_size
        run_host = run_out = run_len = 0  # a pending run of contiguous normal clusters
        pos, end = offset, offset + length
        while pos < end:
            vcluster = pos >> cb
            in_cluster = pos & self._cmask
            count = min(cs - in_cluster, end - pos)
            entry = self._l2_entry(vcluster)
            kind = cluster_kind(entry)
            if kind == NORMAL:
                host = self._data_offset(entry) + in_cluster
                out_pos = pos - out_offset
                if run_len and run_host + run_len == host and run_out + run_len == out_pos:
                    run_len += count
                else:
                    self._read_run(out, run_out, run_host, run_len)
                    run_host, run_out, run_len = host, out_pos, count
            elif kind == UNALLOCATED:
                _add_hole(holes, pos, count)
            elif kind == COMPRESSED:
                data = self._decompressed(entry)
                out[pos - out_offset : pos - out_offset + count] = data[in_cluster : in_cluster + count]
            # ZERO: `out` is already zero there.
            pos += count
        self._read_run(out, run_out, run_host, run_len)
        return holes

    def _read_run(self, out: memoryview, out_pos: int, host: int, length: int) -> None:
        if not length:
            return
        view = out[out_pos : out_pos + length]
        done = 0
        while done < length:
            got = os.preadv(self._fd, [view[done:]], host + done)
            if got == 0:
                raise CorruptImageError(
                    f"{self.filename}: data cluster at {host + done:#x} lies outside the file")
            done += got

    def _data_offset(self, entry: int) -> int:
        host = entry & OFFSET_MASK
        if host & self._cmask:
            raise CorruptImageError(f"{self.filename}: data cluster offset {host:#x} is not cluster aligned")
        return host

    def _decompressed(self, entry: int) -> bytes:
        cached = self._last_decompressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        host, _, length = decode_compressed(entry, self.cluster_bits)
        if host >= self._file_size:
            raise CorruptImageError(f"{self.filename}: compressed cluster at {host:#x} lies outside the file")
        raw = os.pread(self._fd, length, host)
        data = decompress_cluster(raw, self.cluster_size, self.header.compression_type,
                                  f"{self.filename}: cluster at {host:#x}")
        self._last_decompressed = (entry, data)
        return data

    def _map_layer(self, offset: int, length: int) -> tuple[list[Extent], list[Hole]]:
        with self._lock:
            extents: list[Extent] = []
            holes: list[Hole] = []
            cb, cs = self.cluster_bits, self.cluster_size
            pos, end = offset, offset + length
            span = 1 << (cb + self._l2_bits)  # guest bytes one L2 table maps
            while pos < end:
                if not self._l1[pos >> (cb + self._l2_bits)] & OFFSET_MASK:
                    count = min(span - pos % span, end - pos)  # whole L2 table unallocated
                    _add_hole(holes, pos, count)
                    pos += count
                    continue
                count = min(cs - (pos & self._cmask), end - pos)
                kind = cluster_kind(self._l2_entry(pos >> cb))
                if kind == UNALLOCATED:
                    _add_hole(holes, pos, count)
                else:
                    extents.append(Extent(pos, count, "zero" if kind == ZERO else "data"))
                pos += count
            return extents, holes

    # --- writing ---------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._lock:
            self._before_modify()
            self._check_range(offset, len(view))
            self._write_locked(offset, view)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._lock:
            self._before_modify()
            self._check_range(offset, length)
            self._zero_range(offset, length, discard=False)

    def discard(self, offset: int, length: int) -> None:
        with self._lock:
            self._before_modify()
            self._check_range(offset, length)
            self._zero_range(offset, length, discard=True)

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one whole cluster compressed (used by `convert -c`).

        Falls back to a normal write where compression does not pay or the
        cluster already holds data.
        """
        cs = self.cluster_size
        with self._lock:
            self._before_modify()
            self._check_range(offset, len(data))
            if offset & self._cmask or (len(data) != cs and offset + cs < self.size):
                raise ImageError(f"{self.filename}: compressed writes must cover whole clusters")
            self._write_compressed_locked(offset, data)

    # --- flush, resize, close ---------------------------------------------------------

    def flush(self) -> None:
        with self._lock:
            if self.readonly or self._closed:
                return
            self._commit()

    def resize(self, new_size: int) -> None:
        """Grow the virtual disk (shrinking is refused: it could drop data)."""
        with self._lock:
            self._before_modify()
            if new_size < self.size:
                raise ImageError(f"{self.filename}: shrinking qcow2 images is not supported")
            new_size = -(-new_size // 512) * 512  # whole sectors, as qemu-img rounds them
            self._resize_locked(new_size)

    def set_incompatible_bits(self, set_bits: int = 0, clear_bits: int = 0) -> None:
        """Update the dirty/corrupt bits in the header (version 3 only)."""
        if self.header.version < 3:
            return
        with self._lock:
            self._check_writable()
            self._commit()
            value = (self.header.incompatible_features | set_bits) & ~clear_bits
            if value != self.header.incompatible_features:
                self._pwrite(OFFSET_INCOMPATIBLE, struct.pack(">Q", value))
                self._sync()
                self.header.incompatible_features = value

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if not self.readonly:
                    self._commit()
            finally:
                self._closed = True
                os.close(self._fd)
                if self.backing is not None:
                    self.backing.close()

    def abandon(self) -> None:
        """Close without writing cached metadata (as if the process had died; for tests)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
                if self.backing is not None:
                    self.backing.close()

    # --- facts for info/check ---------------------------------------------------------

    def file_size(self) -> int:
        return os.fstat(self._fd).st_size


def _add_hole(holes: list[Hole], start: int, count: int) -> None:
    """Append a hole, merged into the previous one where they touch."""
    if holes and holes[-1][0] + holes[-1][1] == start:
        holes[-1] = (holes[-1][0], holes[-1][1] + count)
    else:
        holes.append((start, count))
