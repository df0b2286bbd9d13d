"""qcow2 write path: cluster mapping, copy-on-write, zeroing, and the metadata commit.

One job: turn a write (or zeroing, or compressed write) of guest bytes into
data written to host clusters plus L2/L1 changes held in memory, and commit
those changes in an order a crash cannot break. `Qcow2Writer` is a mixin of
`Qcow2Image` (qcow2.py), whose public `write`, `write_zeroes`, `discard`,
`write_compressed` and `flush` take the lock, check the range and call in
here; cluster allocation and freeing come from `Qcow2Refcounts`
(qcow2_refcounts.py).

How writes stay crash consistent
--------------------------------
Guest data goes to the file at once (`pwrite`); metadata changes (L2 and
L1 entries, refcounts) are made in memory and written by `_commit()` in an
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

A cluster is written in place only when its L2 entry is NORMAL with the
COPIED flag (refcount 1); otherwise (unallocated, zero, compressed, or
shared with an internal snapshot) the write goes to a newly allocated
cluster, filled with the old content where the write covers only part of
it, and the old cluster is released. An L2 table shared with a snapshot is
copied the same way before its first change. Before the first change of a
session, autoclear feature bits are cleared on disk (see `_before_modify`).
Growing the disk writes a bigger L1 table and commits its refcounts before
the header points to it, and frees the old table only after the header
switch is synced (`_resize_locked`).
"""

from __future__ import annotations

import os
import struct
from array import array

from vmm.image.base import CorruptImageError, ImageError
from vmm.image.compression import compress_cluster
from vmm.image.qcow2_format import (
    COMPRESSED,
    MAX_L1_BYTES,
    NORMAL,
    OFFSET_AUTOCLEAR,
    OFFSET_MASK,
    OFFSET_SIZE,
    OFLAG_COPIED,
    OFLAG_ZERO,
    UNALLOCATED,
    ZERO,
    cluster_kind,
    encode_compressed,
    l1_entries_needed,
)
from vmm.image.qcow2_tables import table_to_bytes

# Past this much dirty metadata (dirty tables are never evicted from the
# caches) the next write commits it first.
_DIRTY_BYTES = 32 << 20


class Qcow2Writer:
    """Where writes go (in place or copy-on-write), zeroing, and the ordered commit."""

    # --- writing data ------------------------------------------------------------------

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
        host, fresh = entry & OFFSET_MASK, False
        if kind == ZERO and host and entry & OFLAG_COPIED:
            self._check_data_cluster(self._data_offset(entry))  # preallocated zero cluster: reuse it
        else:
            host, fresh = self._allocate()
            self._release(entry)
        table[index] = host | OFLAG_COPIED
        self._l2_dirty.add(l2_offset)
        if len(chunk) == self.cluster_size:
            return host, chunk
        if fresh and self._reads_as_zeros(kind):
            # The rest of a fresh cluster reads as zeros already: write only the new bytes (a
            # 4 KiB write into an empty cluster writes 4 KiB, not 64), and give the file the
            # cluster's whole length, as a hole, so that all of it can be read back.
            self._extend_file(host + self.cluster_size)
            return host + in_cluster, chunk
        # Copy-on-write: the rest of the cluster keeps what it read before.
        payload = bytearray(self._cluster_content(vcluster, entry))
        payload[in_cluster : in_cluster + len(chunk)] = chunk
        return host, payload

    def _reads_as_zeros(self, kind: int) -> bool:
        """Whether the guest reads zeros where an L2 entry of this kind maps (its data cluster aside)."""
        return kind == ZERO or (kind == UNALLOCATED and self.backing is None)

    def _extend_file(self, end: int) -> None:
        if self._file_size < end:
            os.ftruncate(self._fd, end)
            self._file_size = end

    def _check_data_cluster(self, host: int) -> None:
        if self._is_metadata_cluster(host >> self.cluster_bits):
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

    # --- zeroing ----------------------------------------------------------------------

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

    # --- compressed clusters ------------------------------------------------------------

    def _write_compressed_locked(self, offset: int, data: bytes) -> None:
        """Write one whole cluster compressed, or normally where that does not pay."""
        cs = self.cluster_size
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

    # --- growing the disk --------------------------------------------------------------

    def _resize_locked(self, new_size: int) -> None:
        """Grow the disk to `new_size` (whole sectors, >= size): a bigger L1 table if needed.

        A new L1 table is written and its refcounts committed before the
        header points to it; the old table is freed only after that switch
        is on disk.
        """
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
            self._move_fixed_clusters(first, old_clusters, new_offset >> self.cluster_bits,
                                      -(-needed * 8 // cs))
            if old_offset:
                self._pending_frees.extend(range(first, first + old_clusters))
            self._l1_offset = new_offset
            self._commit()
        self.header.size, self.header.l1_size, self.header.l1_table_offset = (
            new_size, len(self._l1), new_offset)
        self.size = new_size

    # --- commit (flush) ----------------------------------------------------------------

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

    def _metadata_dirty(self) -> bool:
        return bool(self._l1_dirty or self._l2_dirty or self._rb_dirty or self._reftable_dirty
                    or self._pending_frees or len(self._reftable) * 8 > self._reftable_capacity())

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
        self._sync()  # 1. data
        self._write_refcounts()  # 2. refcount blocks, then the refcount table
        if self._l2_dirty:  # 3.
            for offset in sorted(self._l2_dirty):
                self._pwrite(offset, table_to_bytes(self._l2_cache[offset]))
            self._l2_dirty.clear()
            self._sync()
        if self._l1_dirty:  # 4.
            self._write_l1_entries()
            self._sync()
        if self._pending_frees:  # 5.
            self._apply_frees()
            self._write_refcounts()
        self._data_dirty = False

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
