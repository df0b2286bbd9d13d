"""`check` for qcow2: recount every reference and compare with the refcounts.

Walks everything that owns a host cluster (header, L1 tables of the image
and of every internal snapshot, their L2 tables and data clusters, the
snapshot table, the refcount table and blocks), counts references per host
cluster, and compares the counts with the stored refcounts:

    refcount > references   a leak: wasted space, harmless
    refcount < references   corruption: a cluster could be handed out twice

plus the COPIED flags of the active tables, which must say "refcount is 1".
With `repair="leaks"` leaked refcounts are lowered; with `repair="all"`
too-low refcounts are raised and COPIED flags fixed. Messages mimic
`qemu-img check`. Reading is lenient: a broken table is reported and
skipped, never raised.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from vmm.image.base import ImageError
from vmm.image.qcow2 import Qcow2Image
from vmm.image.qcow2_format import (
    AUTOCLEAR_BITMAPS,
    COMPRESSED,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_RESERVED,
    L2E_RESERVED,
    NORMAL,
    OFFSET_MASK,
    OFLAG_COPIED,
    REFT_RESERVED,
    ZERO,
    cluster_kind,
    decode_compressed,
)
from vmm.image.qcow2_tables import RefcountBlock, table_from_bytes

Progress = Callable[[int, int], None]


@dataclass
class CheckResult:
    filename: str
    format: str = "qcow2"
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """Field names and omissions as `qemu-img check --output=json`."""
        out: dict = {"image-end-offset": self.image_end_offset,
                     "total-clusters": self.total_clusters,
                     "check-errors": self.check_errors,
                     "allocated-clusters": self.allocated_clusters,
                     "filename": self.filename, "format": self.format}
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value:
                out[key] = value
        return out

    @property
    def exit_status(self) -> int:
        """As `qemu-img check` documents: 0 clean, 1 not completed, 2 corrupt, 3 leaks only."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


class _Counter:
    """Reference counts per host cluster, and the walk that fills them."""

    def __init__(self, image: Qcow2Image, result: CheckResult, progress: Progress | None) -> None:
        self.image = image
        self.result = result
        self.progress = progress
        self.cb = image.cluster_bits
        self.cs = image.cluster_size
        self.file_size = os.fstat(image._fd).st_size
        self.nb_clusters = -(-self.file_size // self.cs)
        self.refs = array("I", bytes(4 * self.nb_clusters))
        # (L1 index or None, table offset, L2 index, entry) of active COPIED-flag candidates.
        self.copied: list[tuple[int, int, int, int]] = []
        self.next_cluster = 0

    def error(self, message: str) -> None:
        self.result.messages.append(message)
        self.result.corruptions += 1

    def count(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset >> self.cb, (offset + length - 1) >> self.cb
        if last >= self.nb_clusters:
            self.error("ERROR: counting reference for region exceeding the end of the file by one "
                       f"cluster or more: offset {offset:#x} size {length:#x}")
            return
        for cluster in range(first, last + 1):
            if self.refs[cluster] < 0xFFFFFFFF:
                self.refs[cluster] += 1

    def read_table(self, offset: int) -> array | None:
        data = os.pread(self.image._fd, self.cs, offset)
        if len(data) != self.cs:
            return None
        return table_from_bytes(data)

    def walk_l1(self, l1: array, active: bool, done: list[int], total: int) -> None:
        for l1_index, l1_entry in enumerate(l1):
            l2_offset = l1_entry & OFFSET_MASK
            if not l2_offset:
                continue
            if l1_entry & L1E_RESERVED:
                self.error(f"ERROR: L1 entry {l1_index} has reserved bits set: {l1_entry:#x}")
                continue
            if l2_offset & (self.cs - 1):
                self.error(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                           "L1 entry corrupted")
                continue
            self.count(l2_offset, self.cs)
            if active:
                self.copied.append((l1_index, 0, -1, l1_entry))
            table = self.read_table(l2_offset)
            done[0] += 1
            if self.progress:
                self.progress(done[0], total)
            if table is None:
                continue
            self.walk_l2(table, l2_offset, active)

    def walk_l2(self, table: array, l2_offset: int, active: bool) -> None:
        res = self.result
        for index, entry in enumerate(table):
            if not entry:
                continue
            kind = cluster_kind(entry)
            if kind == COMPRESSED:
                host, sectors, _ = decode_compressed(entry, self.cb)
                if entry & OFLAG_COPIED:
                    self.error(f"ERROR: coffset={host:#x}: copied flag must never be set for "
                               "compressed clusters")
                self.count(host & ~511, sectors * 512)
                if active:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                continue
            if entry & L2E_RESERVED:
                self.error(f"ERROR: L2 entry {entry:#x} at {l2_offset:#x}[{index}] has reserved bits set")
                continue
            host = entry & OFFSET_MASK
            if not host:
                continue
            if host & (self.cs - 1):
                self.error(f"ERROR offset={host:x}: Cluster is not properly aligned; "
                           "L2 entry corrupted.")
                continue
            self.count(host, self.cs)
            if active:
                res.allocated_clusters += 1
                if self.next_cluster and self.next_cluster != host >> self.cb:
                    res.fragmented_clusters += 1
                self.next_cluster = (host >> self.cb) + 1
                if kind in (NORMAL, ZERO):
                    self.copied.append((-1, l2_offset, index, entry))


def check_qcow2(image: Qcow2Image, repair: str | None = None,
                progress: Progress | None = None) -> CheckResult:
    """Check (and with `repair` = "leaks" or "all", repair) a qcow2 image."""
    if repair and image.readonly:
        raise ImageError(f"{image.filename}: repairing needs the image open for writing")
    if not image.readonly:
        image.flush()
    result = _check_once(image, repair, progress)
    if repair and (result.leaks_fixed or result.corruptions_fixed):
        image.flush()
        again = _check_once(image, None, None)
        again.leaks_fixed, again.corruptions_fixed = result.leaks_fixed, result.corruptions_fixed
        again.messages = result.messages + again.messages
        result = again
    if repair == "all" and not result.corruptions:
        # A full repair leaves refcounts exact: the image is neither dirty nor corrupt now.
        image.set_incompatible_bits(clear_bits=INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    return result


def _check_once(image: Qcow2Image, repair: str | None, progress: Progress | None) -> CheckResult:
    result = CheckResult(filename=image.filename)
    result.total_clusters = -(-image.size // image.cluster_size)
    counter = _Counter(image, result, progress)
    cs = image.cluster_size
    hdr = image.header

    l2_total = sum(1 for e in image._l1 if e & OFFSET_MASK)
    snapshot_l1s = []
    for snap in image.snapshots:
        data = os.pread(image._fd, snap.l1_size * 8, snap.l1_table_offset)
        snapshot_l1s.append(table_from_bytes(data[: len(data) // 8 * 8]))
        l2_total += sum(1 for e in snapshot_l1s[-1] if e & OFFSET_MASK)
    done = [0]

    counter.count(0, cs)
    counter.count(image._l1_offset, len(image._l1) * 8)
    counter.walk_l1(image._l1, True, done, l2_total)
    for snap, l1 in zip(image.snapshots, snapshot_l1s, strict=True):
        counter.count(snap.l1_table_offset, snap.l1_size * 8)
        counter.walk_l1(l1, False, done, l2_total)
    if hdr.nb_snapshots:
        counter.count(hdr.snapshots_offset, image._snapshot_table_len)
    counter.count(image._reftable_offset, image._reftable_clusters * cs)
    if hdr.bitmaps and hdr.autoclear_features & AUTOCLEAR_BITMAPS:
        _count_bitmaps(image, counter)

    blocks: dict[int, RefcountBlock] = {}
    for table_index, entry in enumerate(image._reftable):
        offset = entry & ~REFT_RESERVED
        if not offset:
            continue
        if offset & (cs - 1) or entry & REFT_RESERVED:
            counter.error(f"ERROR refcount block {table_index} is not cluster aligned; "
                          "refcount table entry corrupted")
            continue
        if offset >> image.cluster_bits >= counter.nb_clusters:
            counter.error(f"ERROR refcount block {table_index} is outside image")
            continue
        counter.count(offset, cs)
        data = os.pread(image._fd, cs, offset)
        blocks[table_index] = RefcountBlock(data, hdr.refcount_order)

    _compare_refcounts(image, counter, blocks, repair)
    _check_copied(image, counter, blocks, repair)
    return result


def _count_bitmaps(image: Qcow2Image, counter: _Counter) -> None:
    """Persistent dirty bitmaps (valid only while their autoclear bit is set) own clusters too."""
    nb, dir_size, dir_offset = image.header.bitmaps
    if dir_size > 64 << 20:
        counter.error(f"ERROR bitmap directory size {dir_size} is too large")
        return
    counter.count(dir_offset, dir_size)
    directory = os.pread(image._fd, dir_size, dir_offset)
    pos = 0
    for _ in range(nb):
        if pos + 24 > len(directory):
            counter.error("ERROR bitmap directory is truncated")
            return
        table_offset, table_size, _, _, _, name_size, extra = struct.unpack_from(
            ">QIIBBHI", directory, pos)
        pos = (pos + 24 + extra + name_size + 7) & ~7
        counter.count(table_offset, table_size * 8)
        table = os.pread(image._fd, table_size * 8, table_offset)
        for entry in table_from_bytes(table[: len(table) // 8 * 8]):
            if entry & OFFSET_MASK:
                counter.count(entry & OFFSET_MASK, image.cluster_size)


def _stored_refcount(image: Qcow2Image, blocks: dict[int, RefcountBlock], cluster: int) -> int:
    block = blocks.get(cluster >> image._rb_bits)
    return block.get(cluster & image._rb_mask) if block else 0


def _compare_refcounts(image: Qcow2Image, counter: _Counter, blocks: dict[int, RefcountBlock],
                       repair: str | None) -> None:
    res = counter.result
    per_block = 1 << image._rb_bits
    refs = counter.refs
    highest = -1
    covered = set()
    for table_index, block in sorted(blocks.items()):
        base = table_index * per_block
        covered.add(table_index)
        # Like qemu-img, only clusters inside the file count: a refcount past
        # the end of the file is harmless (the allocator skips it).
        count = min(per_block, len(refs) - base)
        if count <= 0:
            continue
        stored = block.values()[:count]
        expected = refs[base : base + count].tolist()
        if stored == expected:
            nonzero = [i for i, v in enumerate(stored) if v]
            if nonzero:
                highest = max(highest, base + nonzero[-1])
            continue
        for i, (have, want) in enumerate(zip(stored, expected, strict=True)):
            if have or want:
                highest = max(highest, base + i)
            if have != want:
                _mismatch(image, res, base + i, have, want, repair)
    # Referenced clusters no refcount block covers.
    for cluster, want in enumerate(refs):
        if want and (cluster // per_block) not in covered:
            highest = max(highest, cluster)
            _mismatch(image, res, cluster, 0, want, repair)
    res.image_end_offset = (highest + 1) * image.cluster_size


def _mismatch(image: Qcow2Image, res: CheckResult, cluster: int, have: int, want: int,
              repair: str | None) -> None:
    leak = have > want
    fixable = (leak and repair in ("leaks", "all")) or (not leak and repair == "all")
    if fixable and want > image.refcount_max:
        res.messages.append(f"ERROR cluster {cluster}: {want} references exceed the maximum "
                            f"refcount {image.refcount_max}")
        fixable = False
    word = "Repairing" if fixable else ("Leaked" if leak else "ERROR")
    res.messages.append(f"{word} cluster {cluster} refcount={have} reference={want}")
    if fixable:
        image._set_refcount(cluster, want)
        if leak:
            res.leaks_fixed += 1
        else:
            res.corruptions_fixed += 1
    if leak:
        res.leaks += 1
    else:
        res.corruptions += 1


def _check_copied(image: Qcow2Image, counter: _Counter, blocks: dict[int, RefcountBlock],
                  repair: str | None) -> None:
    res = counter.result
    for l1_index, l2_offset, index, entry in counter.copied:
        host = entry & OFFSET_MASK
        cluster = host >> image.cluster_bits
        if cluster < len(counter.refs) and repair == "all":
            refcount = counter.refs[cluster]  # what the refcount is after the repair
        else:
            refcount = _stored_refcount(image, blocks, cluster)
        if (refcount == 1) == bool(entry & OFLAG_COPIED):
            continue
        if index < 0:
            res.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} "
                                f"l1_entry={entry:x} refcount={refcount}")
        else:
            res.messages.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} "
                                f"refcount={refcount}")
        res.corruptions += 1
        if repair == "all":
            fixed = entry | OFLAG_COPIED if refcount == 1 else entry & ~OFLAG_COPIED
            if index < 0:
                image._l1[l1_index] = fixed
                image._l1_dirty.add(l1_index)
            else:
                table = image._get_l2(l2_offset)
                table[index] = fixed
                image._l2_dirty.add(l2_offset)
            res.corruptions_fixed += 1
