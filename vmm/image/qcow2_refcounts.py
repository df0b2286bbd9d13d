"""qcow2 refcount bookkeeping: counting, allocating and freeing host clusters.

One job: keep the refcount table and refcount blocks right, in memory and
on disk. `Qcow2Refcounts` is a mixin of `Qcow2Image` (qcow2.py); it works on
the image's state (`_reftable`, `_rb_cache`, `_rb_dirty`, `_reftable_dirty`,
`_pending_frees`, `_reusable`, ...; set up in `Qcow2Image._open`) and on its
file helpers (`_pread`, `_pwrite`, `_sync`).

Crash-consistency ordering this module is responsible for (step 2 and the
frees of step 5 of the commit in qcow2_write.py):

- Allocation only increments refcounts in memory; the commit writes the
  refcount blocks, syncs, then the refcount table entries that point to
  new blocks, and syncs again, all before any L2/L1 entry that uses the
  clusters. On disk a cluster is therefore counted before it is used.
- A new cluster comes from the end of the file, from free clusters inside
  the file as it was opened (their freeing is already on disk), or from
  clusters this session freed and whose freeing reached the disk
  (`_reusable`): never from a cluster an on-disk mapping may still name.
- Decrements (`_release`) are only queued; `_apply_frees` runs once the
  mappings that stopped using the clusters are on disk.
- Growing the refcount table: the refcount blocks that count the new table
  are written and synced, then the new table, then the header switches to
  it; only then are the old table's clusters freed.
"""

from __future__ import annotations

import struct
from array import array

from vmm.image.base import CorruptImageError, ImageError
from vmm.image.qcow2_format import (
    COMPRESSED,
    MAX_REFTABLE_BYTES,
    OFFSET_MASK,
    OFFSET_REFCOUNT_TABLE,
    REFT_RESERVED,
    cluster_kind,
    decode_compressed,
)
from vmm.image.qcow2_tables import RefcountBlock, table_to_bytes


class Qcow2Refcounts:
    """Refcount lookups, cluster allocation, freeing and refcount-table growth."""

    # --- reading and setting refcounts ---------------------------------------------

    def _get_refblock(self, offset: int) -> RefcountBlock:
        return self._cached_table(self._rb_cache, self._rb_dirty, offset, self._load_refblock)

    def _load_refblock(self, offset: int) -> RefcountBlock:
        self._check_table_offset(offset, "refcount block")
        return RefcountBlock(self._pread(offset, self.cluster_size, "refcount block"),
                             self.header.refcount_order)

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

    # --- allocation -----------------------------------------------------------------

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
        """A cluster with refcount 1, as a byte offset."""
        return self._allocate()[0]

    def _allocate(self) -> tuple[int, bool]:
        """A cluster with refcount 1, as a byte offset, and whether it is fresh: claimed past the
        end of the file, never written, so every byte of it reads as zero.

        Preference: clusters freed in this session, then free clusters inside
        the file as it was opened (freed by earlier sessions; their freeing is
        on disk, so nothing on disk maps them), then the end of the file.
        """
        fresh = False
        while self._reusable:
            index = self._reusable.pop()
            if self.refcount(index) == 0:
                break
        else:
            index = self._find_free_in_file()
            if index is None:
                index, fresh = self._claim_fresh(1), True
        self._set_refcount(index, 1)
        return index << self.cluster_bits, fresh

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
            if self._is_metadata_cluster(index):
                continue  # refcount 0 on metadata: a damaged image; never hand it out
            return index
        return None

    # --- freeing ----------------------------------------------------------------------

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
            if self._decrement(index):
                self._l2_clusters.discard(index)
        self._pending_frees.clear()

    def _decrement(self, index: int) -> bool:
        """Drop one reference to cluster `index`; True if that freed it (it becomes reusable
        once this decrement is on disk, which the caller's commit ensures)."""
        count = self.refcount(index)
        if count == 0:
            return False  # already inconsistent; `check` will report it, don't make it worse
        self._set_refcount(index, count - 1)
        if count == 1:
            self._reusable.append(index)
            return True
        return False

    # --- writing refcounts to disk -----------------------------------------------------

    def _reftable_capacity(self) -> int:
        return self._reftable_clusters * self.cluster_size

    def _write_refcounts(self) -> None:
        if len(self._reftable) * 8 > self._reftable_capacity():
            self._relocate_reftable()
        self._write_dirty_refblocks()
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
        self._write_dirty_refblocks()
        table = array("Q", self._reftable)
        table.extend([0] * (clusters * cs // 8 - len(table)))
        self._pwrite(start * cs, table_to_bytes(table))
        self._sync()
        self._pwrite(OFFSET_REFCOUNT_TABLE, struct.pack(">QI", start * cs, clusters))
        self._sync()
        old_start, old_count = self._reftable_offset >> self.cluster_bits, self._reftable_clusters
        self._move_fixed_clusters(old_start, old_count, start, clusters)
        self._reftable_offset, self._reftable_clusters = start * cs, clusters
        self.header.refcount_table_offset = start * cs
        self.header.refcount_table_clusters = clusters
        self._reftable_dirty.clear()
        for index in range(old_start, old_start + old_count):
            self._decrement(index)

    def _write_dirty_refblocks(self) -> None:
        if self._rb_dirty:
            for offset in sorted(self._rb_dirty):
                self._pwrite(offset, self._rb_cache[offset].to_bytes())
            self._rb_dirty.clear()
            self._sync()

    # --- compressed clusters ---------------------------------------------------------

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

