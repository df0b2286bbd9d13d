"""qcow2 images: reading, writing, allocation, copy-on-write, growing.

How writes stay crash consistent
--------------------------------
Guest data goes to the file at once (`pwrite`); metadata changes (L2 and
L1 entries, refcounts) are made in memory and written by `flush()` in an
order that never lets the on-disk image point at something not yet there:

    1. fdatasync                     data clusters before anything maps them
    2. refcount blocks, fdatasync    a new cluster is counted before it is used
       refcount table, fdatasync     (a new refcount block before the table
                                     entry that points to it)
    3. L2 tables, fdatasync          a new L2 table before the L1 entry to it
    4. L1 entries, fdatasync
    5. decrements of refcounts of clusters that stopped being referenced,
       fdatasync                     (only once nothing on disk maps them)

A process killed between any two writes therefore leaves an image whose
refcounts are at least the true reference counts: leaked clusters at worst,
never a cluster used twice. Clusters are allocated at the end of the file,
or reused only once their freeing is complete on disk, so a kill never
leaves an on-disk mapping pointing at a cluster that was overwritten with
other data. Data written before a completed `flush()` survives; data
written after it may or may not.

What a cluster's L2 entry can say
---------------------------------
    unallocated   read from the backing image (zeros if there is none)
    zero          (version 3) reads as zeros, whatever the backing says
    normal        host cluster at the given offset; with the COPIED flag
                  its refcount is 1 and it may be written in place,
                  without it (shared with an internal snapshot) a write
                  copies it to a new cluster first
    compressed    a compressed cluster at a byte offset; writes copy it out

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
from vmm.image.compression import compress_cluster, decompress_cluster
from vmm.image.qcow2_format import (
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOT_TABLE_BYTES,
    OFFSET_AUTOCLEAR,
    OFFSET_INCOMPATIBLE,
    OFFSET_MASK,
    OFFSET_REFCOUNT_TABLE,
    OFFSET_SIZE,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_RESERVED,
    Header,
    decode_compressed,
    encode_compressed,
    l1_entries_needed,
    parse_header,
    parse_snapshots,
)
from vmm.image.qcow2_tables import RefcountBlock, table_from_bytes, table_to_bytes

# Cluster kinds, from an L2 entry.
UNALLOCATED, ZERO, NORMAL, COMPRESSED = range(4)

# Bounds on cached metadata. Dirty tables are never evicted; past this much
# dirty metadata the next write commits it first.
_CACHE_BYTES = 32 << 20
_DIRTY_BYTES = 32 << 20
_IOV_MAX = 1024


def cluster_kind(entry: int) -> int:
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & OFLAG_ZERO:
        return ZERO
    return NORMAL if entry & OFFSET_MASK else UNALLOCATED


class Qcow2Image(BlockDevice):
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
        self._pending_frees: list[int] = []  # cluster indices to decrement after the next commit
        self._reusable: list[int] = []  # clusters freed on disk in this session
        self._next_free = -(-self._file_size // cs)
        self._scan_pos, self._scan_end = 1, self._next_free  # free clusters inside the file
        self._data_dirty = False
        self._modified = False
        self._compressed_pos: int | None = None  # where the next compressed cluster may start
        self._compressed_end = 0  # end of the host clusters reserved for compressed data
        self._last_decompressed: tuple[int, bytes] | None = None

    def _add_range(self, clusters: set[int], offset: int, length: int) -> None:
        if length > 0:
            first, last = offset >> self.cluster_bits, (offset + length - 1) >> self.cluster_bits
            clusters.update(range(first, last + 1))

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
        table = self._l2_cache.get(offset)
        if table is not None:
            self._l2_cache.move_to_end(offset)
            return table
        self._check_table_offset(offset, "L2 table")
        if offset >> self.cluster_bits in self._refblock_clusters:
            raise CorruptImageError(f"{self.filename}: L2 table at {offset:#x} overlaps a refcount block")
        table = table_from_bytes(self._pread(offset, self.cluster_size, "L2 table"))
        self._l2_cache[offset] = table
        self._evict(self._l2_cache, self._l2_dirty)
        return table

    def _get_refblock(self, offset: int) -> RefcountBlock:
        block = self._rb_cache.get(offset)
        if block is not None:
            self._rb_cache.move_to_end(offset)
            return block
        self._check_table_offset(offset, "refcount block")
        block = RefcountBlock(self._pread(offset, self.cluster_size, "refcount block"),
                              self.header.refcount_order)
        self._rb_cache[offset] = block
        self._evict(self._rb_cache, self._rb_dirty)
        return block

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

    # --- refcounts and allocation ---------------------------------------------------------

    def _refblock_offset(self, index: int) -> int:
        table_index = index >> self._rb_bits
        if table_index >= len(self._reftable):
            return 0
        entry = self._reftable[table_index]
        if entry & REFT_RESERVED:
            raise CorruptImageError(f"{self.filename}: refcount table entry {table_index} is invalid")
        return entry

    def refcount(self, index: int) -> int:
        """The refcount of host cluster `index` (0 where no refcount block covers it)."""
        offset = self._refblock_offset(index)
        if not offset:
            return 0
        return self._get_refblock(offset).get(index & self._rb_mask)

    def _set_refcount(self, index: int, value: int) -> None:
        table_index = index >> self._rb_bits
        offset = self._refblock_offset(index)
        if not offset:
            offset = self._new_refblock(table_index)
        block = self._get_refblock(offset)
        try:
            block.set(index & self._rb_mask, value)
        except OverflowError:
            raise CorruptImageError(
                f"{self.filename}: refcount of cluster {index} would overflow "
                f"({value} > {self.refcount_max})") from None
        self._rb_dirty.add(offset)

    def _new_refblock(self, table_index: int) -> int:
        """Create the refcount block for table slot `table_index`; it counts its own cluster too."""
        if table_index >= len(self._reftable):
            # The table grows in memory; flush moves it to a bigger place on disk if needed.
            if (table_index + 1) * 8 > MAX_REFTABLE_BYTES:
                raise ImageError(f"{self.filename}: image file would exceed the refcount table limit")
            self._reftable.extend([0] * (table_index + 1 - len(self._reftable)))
        index = self._claim_fresh(1)
        offset = index << self.cluster_bits
        self._rb_cache[offset] = RefcountBlock(bytes(self.cluster_size), self.header.refcount_order)
        self._rb_dirty.add(offset)
        self._refblock_clusters.add(index)
        self._reftable[table_index] = offset
        self._reftable_dirty.add(table_index)
        self._set_refcount(index, 1)
        return offset

    def _claim_fresh(self, count: int) -> int:
        """Reserve `count` contiguous never-used clusters at the end of the file (refcount left 0)."""
        start = self._next_free
        while True:
            busy = next((k for k in range(count) if self.refcount(start + k)), None)
            if busy is None:
                break
            start += busy + 1  # a stale refcount past the end of the file: skip that cluster
        self._next_free = start + count
        return start

    def _alloc_cluster(self) -> int:
        """A cluster with refcount 1, as a byte offset.

        Preference: clusters freed in this session, then free clusters inside
        the file as it was opened (freed by earlier sessions; their freeing is
        on disk, so nothing on disk maps them), then the end of the file.
        """
        while self._reusable:
            index = self._reusable.pop()
            if self.refcount(index) == 0:
                break
        else:
            index = self._find_free_in_file()
            if index is None:
                index = self._claim_fresh(1)
        self._set_refcount(index, 1)
        return index << self.cluster_bits

    def _find_free_in_file(self) -> int | None:
        """The next cluster with refcount 0 below the file's size at open time (scanned once)."""
        while self._scan_pos < self._scan_end:
            pos = self._scan_pos
            table_index = pos >> self._rb_bits
            block_start = table_index << self._rb_bits
            block_end = min(block_start + (1 << self._rb_bits), self._scan_end)
            offset = self._refblock_offset(pos)
            if not offset:  # no refcount block here: ours to take only via the end of file
                self._scan_pos = block_end
                continue
            found = self._get_refblock(offset).find_zero(pos - block_start, block_end - block_start)
            if found is None:
                self._scan_pos = block_end
                continue
            index = block_start + found
            self._scan_pos = index + 1
            if (index in self._fixed_clusters or index in self._l2_clusters
                    or index in self._refblock_clusters):
                continue  # refcount 0 on metadata: a damaged image; never hand it out
            return index
        return None

    def _release(self, entry: int) -> None:
        """Queue the decrement of the host clusters an L2 entry used (applied after the next commit)."""
        kind = cluster_kind(entry)
        if kind == COMPRESSED:
            host, sectors, _ = decode_compressed(entry, self.cluster_bits)
            start = host & ~511
            first, last = start >> self.cluster_bits, (start + sectors * 512 - 1) >> self.cluster_bits
            self._pending_frees.extend(range(first, last + 1))
        elif entry & OFFSET_MASK:
            self._pending_frees.append((entry & OFFSET_MASK) >> self.cluster_bits)

    def _apply_frees(self) -> None:
        for index in self._pending_frees:
            count = self.refcount(index)
            if count == 0:
                continue  # already inconsistent; `check` will report it, don't make it worse
            self._set_refcount(index, count - 1)
            if count == 1:
                self._l2_clusters.discard(index)
                self._reusable.append(index)
        self._pending_frees.clear()

    # --- commit (flush) ---------------------------------------------------------------

    def _metadata_dirty(self) -> bool:
        return bool(self._l1_dirty or self._l2_dirty or self._rb_dirty or self._reftable_dirty
                    or self._pending_frees or len(self._reftable) * 8 > self._reftable_capacity())

    def _reftable_capacity(self) -> int:
        return self._reftable_clusters * self.cluster_size

    def _commit(self) -> None:
        """Write all cached metadata in crash-safe order (see the module docstring)."""
        if self._compressed_pos is not None and self._file_size < self._compressed_end:
            # Readers fetch whole sectors of compressed data; don't let them end past EOF.
            os.ftruncate(self._fd, self._compressed_end)
            self._file_size = self._compressed_end
        if not self._metadata_dirty():
            if self._data_dirty:
                self._sync()
                self._data_dirty = False
            return
        self._sync()
        self._write_refcounts()
        if self._l2_dirty:
            for offset in sorted(self._l2_dirty):
                self._pwrite(offset, table_to_bytes(self._l2_cache[offset]))
            self._l2_dirty.clear()
            self._sync()
        if self._l1_dirty:
            self._write_l1_entries()
            self._sync()
        if self._pending_frees:
            self._apply_frees()
            self._write_refcounts()
        self._data_dirty = False

    def _write_refcounts(self) -> None:
        if len(self._reftable) * 8 > self._reftable_capacity():
            self._relocate_reftable()
        if self._rb_dirty:
            for offset in sorted(self._rb_dirty):
                self._pwrite(offset, self._rb_cache[offset].to_bytes())
            self._rb_dirty.clear()
            self._sync()
        if self._reftable_dirty:
            for index in sorted(self._reftable_dirty):
                self._pwrite(self._reftable_offset + 8 * index,
                             struct.pack(">Q", self._reftable[index]))
            self._reftable_dirty.clear()
            self._sync()

    def _relocate_reftable(self) -> None:
        """Move the refcount table to a bigger place at the end of the file."""
        cs = self.cluster_size
        clusters = max(2 * self._reftable_clusters, -(-len(self._reftable) * 8 // cs))
        while True:
            clusters = min(clusters, MAX_REFTABLE_BYTES // cs)
            start = self._claim_fresh(clusters)
            for k in range(clusters):
                self._set_refcount(start + k, 1)  # may add refcount blocks, growing the table
            if len(self._reftable) * 8 <= clusters * cs:
                break
            if clusters * cs >= MAX_REFTABLE_BYTES:
                raise ImageError(f"{self.filename}: image file would exceed the refcount table limit")
            for k in range(clusters):  # never used: give them back and try a bigger table
                self._set_refcount(start + k, 0)
            clusters *= 2
        # The refcount blocks (which now count the new table) go first, then
        # the table, then the header switches to it.
        for offset in sorted(self._rb_dirty):
            self._pwrite(offset, self._rb_cache[offset].to_bytes())
        self._rb_dirty.clear()
        self._sync()
        table = array("Q", self._reftable)
        table.extend([0] * (clusters * cs // 8 - len(table)))
        self._pwrite(start * cs, table_to_bytes(table))
        self._sync()
        self._pwrite(OFFSET_REFCOUNT_TABLE, struct.pack(">QI", start * cs, clusters))
        self._sync()
        old_start, old_count = self._reftable_offset >> self.cluster_bits, self._reftable_clusters
        self._fixed_clusters.difference_update(range(old_start, old_start + old_count))
        self._fixed_clusters.update(range(start, start + clusters))
        self._reftable_offset, self._reftable_clusters = start * cs, clusters
        self.header.refcount_table_offset = start * cs
        self.header.refcount_table_clusters = clusters
        self._reftable_dirty.clear()
        for index in range(old_start, old_start + old_count):
            count = self.refcount(index)
            if count:
                self._set_refcount(index, count - 1)
                if count == 1:
                    self._reusable.append(index)

    def _write_l1_entries(self) -> None:
        dirty = sorted(self._l1_dirty)
        run_start = prev = dirty[0]
        for index in dirty[1:] + [None]:
            if index is not None and index == prev + 1:
                prev = index
                continue
            self._pwrite(self._l1_offset + 8 * run_start,
                         table_to_bytes(self._l1[run_start : prev + 1]))
            if index is not None:
                run_start = prev = index
        self._l1_dirty.clear()

    def _before_modify(self) -> None:
        self._check_writable()
        if self._closed:
            raise ImageError(f"{self.filename}: image is closed")
        if not self._modified:
            self._modified = True
            if self.header.autoclear_features and self.header.version >= 3:
                # Autoclear features (e.g. dirty bitmaps) describe the data;
                # we don't maintain them, so declare them stale before writing.
                self._pwrite(OFFSET_AUTOCLEAR, struct.pack(">Q", 0))
                self._sync()
                self.header.autoclear_features = 0
        dirty = (len(self._l2_dirty) + len(self._rb_dirty)) * self.cluster_size
        if dirty > _DIRTY_BYTES:
            self._commit()

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
                if holes and holes[-1][0] + holes[-1][1] == pos:
                    holes[-1] = (holes[-1][0], holes[-1][1] + count)
                else:
                    holes.append((pos, count))
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
                    holes.append((pos, count))
                    pos += count
                    continue
                count = min(cs - (pos & self._cmask), end - pos)
                kind = cluster_kind(self._l2_entry(pos >> cb))
                if kind == UNALLOCATED:
                    holes.append((pos, count))
                else:
                    extents.append(Extent(pos, count, "zero" if kind == ZERO else "data"))
                pos += count
            return extents, _merge_holes(holes)

    # --- writing ---------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._lock:
            self._before_modify()
            self._check_range(offset, len(view))
            self._write_locked(offset, view)

    def _write_locked(self, offset: int, view: memoryview) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        pending: list[tuple[int, memoryview | bytes | bytearray]] = []
        pos, end, done = offset, offset + len(view), 0
        while pos < end:
            in_cluster = pos & self._cmask
            count = min(cs - in_cluster, end - pos)
            pending.append(self._prepare_cluster_write(pos >> cb, in_cluster, view[done : done + count]))
            pos += count
            done += count
        # Write the data, merging host-contiguous pieces into one system call.
        run_start, run_bufs, run_end = 0, [], -1
        for host, payload in pending:
            if host != run_end and run_bufs:
                self._pwritev(run_start, run_bufs)
                run_bufs = []
            if not run_bufs:
                run_start = host
            run_bufs.append(payload)
            run_end = host + len(payload)
        if run_bufs:
            self._pwritev(run_start, run_bufs)
        self._data_dirty = True

    def _prepare_cluster_write(self, vcluster: int, in_cluster: int, chunk: memoryview):
        """Decide where one cluster's piece of a write goes: (host offset, bytes to write there)."""
        table, index, l2_offset = self._l2_for_update(vcluster)
        entry = table[index]
        kind = cluster_kind(entry)
        if kind == NORMAL and entry & OFLAG_COPIED:
            host = self._data_offset(entry)
            self._check_data_cluster(host)
            return host + in_cluster, chunk
        if len(chunk) == self.cluster_size:
            payload = chunk
        else:  # copy-on-write: the rest of the cluster keeps what it read before
            payload = bytearray(self._cluster_content(vcluster, entry))
            payload[in_cluster : in_cluster + len(chunk)] = chunk
        host = entry & OFFSET_MASK
        if kind == ZERO and host and entry & OFLAG_COPIED:
            self._check_data_cluster(self._data_offset(entry))  # preallocated zero cluster: reuse it
        else:
            host = self._alloc_cluster()
            self._release(entry)
        table[index] = host | OFLAG_COPIED
        self._l2_dirty.add(l2_offset)
        return host, payload

    def _check_data_cluster(self, host: int) -> None:
        cluster = host >> self.cluster_bits
        if (cluster in self._fixed_clusters or cluster in self._l2_clusters
                or cluster in self._refblock_clusters):
            raise CorruptImageError(
                f"{self.filename}: data cluster at {host:#x} overlaps metadata; refusing to write")

    def _cluster_content(self, vcluster: int, entry: int) -> bytes:
        kind = cluster_kind(entry)
        cs = self.cluster_size
        if kind == NORMAL:
            buf = bytearray(cs)
            self._read_run(memoryview(buf), 0, self._data_offset(entry), cs)
            return bytes(buf)
        if kind == COMPRESSED:
            return self._decompressed(entry)
        buf = bytearray(cs)
        if kind == UNALLOCATED and self.backing is not None:
            start = vcluster << self.cluster_bits
            self.backing._read_chain(memoryview(buf), start, start, cs)
        return bytes(buf)

    def _l2_for_update(self, vcluster: int) -> tuple[array, int, int]:
        """The L2 table for `vcluster`, allocated or copied so that it may be modified."""
        l1_index = vcluster >> self._l2_bits
        l1_entry = self._l1[l1_index]
        old = l1_entry & OFFSET_MASK
        if old and l1_entry & OFLAG_COPIED:
            return self._get_l2(old), vcluster & self._l2_mask, old
        if old:  # shared with a snapshot: copy it
            table = array("Q", self._get_l2(old))
        else:
            table = array("Q", bytes(self.cluster_size))
        new = self._alloc_cluster()
        if old:
            self._pending_frees.append(old >> self.cluster_bits)
        self._l2_cache[new] = table
        self._l2_dirty.add(new)
        self._l2_clusters.add(new >> self.cluster_bits)
        self._l1[l1_index] = new | OFLAG_COPIED
        self._l1_dirty.add(l1_index)
        return table, vcluster & self._l2_mask, new

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

    def _zero_range(self, offset: int, length: int, discard: bool) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        pos, end = offset, offset + length
        while pos < end:
            vcluster = pos >> cb
            cluster_start = vcluster << cb
            cluster_end = min(cluster_start + cs, self.size)
            count = min(cluster_end, end) - pos
            if pos == cluster_start and pos + count == cluster_end:
                self._zero_cluster(vcluster, discard)
            elif not discard:
                self._write_locked(pos, memoryview(bytes(count)))
            pos += count

    def _zero_cluster(self, vcluster: int, discard: bool) -> None:
        entry = self._l2_entry(vcluster)
        kind = cluster_kind(entry)
        if kind == ZERO or (kind == UNALLOCATED and self.backing is None):
            return
        if self.header.version >= 3:
            new_entry = OFLAG_ZERO
        elif self.backing is None:
            new_entry = 0  # unallocated reads as zeros when there is no backing file
        else:
            if not discard:  # version 2 over a backing file: only real zeros hide it
                self._write_locked(vcluster << self.cluster_bits, memoryview(bytes(self.cluster_size)))
            return
        table, index, l2_offset = self._l2_for_update(vcluster)
        self._release(table[index])
        table[index] = new_entry
        self._l2_dirty.add(l2_offset)

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
            vcluster = offset >> self.cluster_bits
            if cluster_kind(self._l2_entry(vcluster)) not in (UNALLOCATED, ZERO):
                self._write_locked(offset, memoryview(data))
                return
            packed = compress_cluster(bytes(data) + bytes(cs - len(data)), self.header.compression_type)
            if len(packed) >= cs - 512:
                self._write_locked(offset, memoryview(data))
                return
            host = self._place_compressed(len(packed))
            self._pwrite(host, packed)
            table, index, l2_offset = self._l2_for_update(vcluster)
            self._release(table[index])
            table[index] = encode_compressed(host, len(packed), self.cluster_bits)
            self._l2_dirty.add(l2_offset)
            self._data_dirty = True

    def _place_compressed(self, length: int) -> int:
        """Find room for `length` bytes of compressed data and count the clusters it touches.

        Compressed clusters are packed back to back at byte granularity; a
        host cluster holding pieces of N compressed clusters has refcount N.
        """
        cb, cs = self.cluster_bits, self.cluster_size
        pos = self._compressed_pos
        if pos is not None and pos + length > self._compressed_end:
            more = -(-(pos + length - self._compressed_end) // cs)
            start = self._claim_fresh(more)
            if start << cb == self._compressed_end:
                self._compressed_end += more << cb  # contiguous: spill into the next cluster
            else:
                pos = None
        first = None if pos is None else pos >> cb
        last = None if pos is None else (pos + length - 1) >> cb
        if pos is None or any(self.refcount(c) >= self.refcount_max for c in range(first, last + 1)):
            start = self._claim_fresh(1)
            pos, self._compressed_end = start << cb, (start + 1) << cb
            first = last = start
        for cluster in range(first, last + 1):
            self._set_refcount(cluster, self.refcount(cluster) + 1)
        self._compressed_pos = pos + length
        return pos

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
            self._commit()
            cs = self.cluster_size
            needed = l1_entries_needed(new_size, self.cluster_bits)
            old_size, old_offset = len(self._l1), self._l1_offset
            old_clusters = -(-old_size * 8 // cs)
            if needed * 8 > MAX_L1_BYTES:
                raise ImageError(f"{self.filename}: {new_size} bytes is too large for this cluster size")
            new_offset = old_offset
            if needed > old_size:
                grown = array("Q", self._l1)
                grown.extend([0] * (needed - old_size))
                if old_offset and needed * 8 <= old_clusters * cs:
                    # The L1 table's last cluster has room: zero the new entries in place.
                    self._pwrite(old_offset + old_size * 8, bytes((needed - old_size) * 8))
                    self._sync()
                else:
                    clusters = -(-needed * 8 // cs)
                    start = self._claim_fresh(clusters)
                    for k in range(clusters):
                        self._set_refcount(start + k, 1)
                    new_offset = start * cs
                    image = table_to_bytes(grown)
                    self._pwrite(new_offset, image + bytes(clusters * cs - len(image)))
                    self._commit()  # the new table's refcounts reach the disk before the header
                self._l1 = grown
            self._pwrite(OFFSET_SIZE, struct.pack(">QIIQ", new_size, self.header.crypt_method,
                                                  len(self._l1), new_offset))
            self._sync()
            if new_offset != old_offset:
                first = old_offset >> self.cluster_bits
                self._fixed_clusters.difference_update(range(first, first + old_clusters))
                self._fixed_clusters.update(range(new_offset >> self.cluster_bits,
                                                  (new_offset >> self.cluster_bits) + -(-needed * 8 // cs)))
                if old_offset:
                    self._pending_frees.extend(range(first, first + old_clusters))
                self._l1_offset = new_offset
                self._commit()
            self.header.size, self.header.l1_size, self.header.l1_table_offset = (
                new_size, len(self._l1), new_offset)
            self.size = new_size

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

    @property
    def dirty_flag(self) -> bool:
        return self.header.dirty


def _merge_holes(holes: list[Hole]) -> list[Hole]:
    merged: list[Hole] = []
    for start, count in holes:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + count)
        else:
            merged.append((start, count))
    return merged
