"""virtio-blk's compiled request path (devices/virtio/blk_requests.c) against the Python path.

The same guest memory, queue state and disk file go through each, and must
come out byte for byte the same: guest RAM (data, status bytes, the used
ring, avail_event), the queue's indices, the file, the outcome (a request's
error status, or the queue broken with the same message), the interrupt
decisions and the ranges reported to the software CPU. The chains are
Linux's shapes with fields changed at random: headers of every request type
and sectors at and past the disk's end, buffers outside RAM or empty, loops,
flags, indirect tables malformed or nested, an avail index run ahead.
"""

from __future__ import annotations

import os
import struct

import pytest
from cffi import FFI
from hypothesis import given
from hypothesis import strategies as st

from devices.virtio import blk
from devices.virtio import blk_requests as blk_requests_module
from devices.virtio.blk import VirtioBlock
from devices.virtio.device import Activation
from devices.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
)
from tests.fuzzing import fuzz_settings
from tests.unit.virtio_driver import blk_requests
from vmm.image.open import open_image
from vmm.layout import HIGH_RAM_START, MMIO_HOLE_START
from vmm.memory import GuestMemory, NativeWriteListener

MEMORY_SIZE = 2 << 20
SIZE = 16  # queue entries
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HEADER = 0x4000  # four request headers, 32 bytes apart
STATUS = 0x5000  # status bytes, 16 apart
TABLE = 0x6000   # two indirect tables, 0x100 apart
DATA = 0x10000   # data buffers, 0x2000 apart
DISK_SECTORS = 64
R, W = DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE  # a readable / writable buffer with a next

# The direct table: the shapes Linux gives requests, by head: 0 a 4 KiB read, 3 a 1 KiB
# write, 6 a header split in two with the status byte at a data buffer's end, 10 and 11
# indirect tables, 12 header and status only (a flush), 14 an empty buffer before the status.
LAYOUT = [
    (HEADER, 16, R, 1), (DATA, 4096, W, 2), (STATUS, 1, DESC_F_WRITE, 0),
    (HEADER + 32, 16, R, 4), (DATA + 0x2000, 1024, R, 5), (STATUS + 16, 1, DESC_F_WRITE, 0),
    (HEADER + 64, 8, R, 7), (HEADER + 72, 8, R, 8), (DATA + 0x4000, 512, W, 9), (DATA + 0x4800, 1, DESC_F_WRITE, 0),
    (TABLE, 64, DESC_F_INDIRECT, 0), (TABLE + 0x100, 48, DESC_F_INDIRECT, 0),
    (HEADER + 96, 16, R, 13), (STATUS + 32, 1, DESC_F_WRITE, 0),
    (HEADER, 16, R, 15), (DATA + 0x6000, 0, W, 13),
]
TABLES = [
    [(HEADER + 96, 16, R, 1), (DATA + 0x8000, 2048, W, 2), (DATA + 0xA000, 2048, W, 3), (STATUS + 48, 1, DESC_F_WRITE, 0)],
    [(HEADER + 32, 16, R, 1), (DATA + 0xC000, 4096, R, 2), (STATUS + 64, 1, DESC_F_WRITE, 0)],
]
ADDRESSES = [HEADER, HEADER + 8, DATA, DATA + 0x2001, STATUS, TABLE, DESC, USED, MEMORY_SIZE - 512,
             MEMORY_SIZE - 1, MEMORY_SIZE, 1 << 40, (1 << 64) - 16]
LENGTHS = [0, 1, 8, 15, 16, 17, 48, 64, 512, 513, 4096, 0x10000, 0xFFFF_FFFF]
TYPES = [blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID, blk.T_DISCARD, blk.T_WRITE_ZEROES, 99]
SECTORS = [0, 1, 7, DISK_SECTORS - 8, DISK_SECTORS - 1, DISK_SECTORS, DISK_SECTORS + 1, 1 << 55, (1 << 64) - 1]


class Run:
    """One device, queue, guest memory and disk file, set up from a state."""

    def __init__(self, path: str, tmp_path, state: dict, memory_size: int = MEMORY_SIZE,
                 firmware_page: int | None = None) -> None:
        self.file = tmp_path / f"{path}.raw"
        self.file.write_bytes(state["disk"])
        self.memory = GuestMemory(memory_size)
        if firmware_page is not None:  # a region of its own, as SeaBIOS's (GuestMemory.add_firmware)
            self.memory.add_firmware(firmware_page, bytes(4096))
        self.memory.write(0, state["memory"])
        self.reports: list[tuple[int, int]] = []
        # The software CPU listens for device writes to guest RAM; KVM does not. On the
        # vCPU's thread the compiled path calls the listener's C function instead.
        self.memory.device_write_listener = self.reports.extend if state["listening"] else None
        self.native_reports: list[tuple[int, int]] = []
        if state["listening"] in ("native", "native elsewhere"):
            self._native = native_listener(self.memory, self.native_reports)
            available = state["listening"] == "native"
            self.memory.native_write_listener = lambda: self._native[0] if available else None
        self.interrupts: list[bool] = []
        self.image = open_image(str(self.file), "raw", readonly=state["image_readonly"])
        self.device = VirtioBlock(self.image, serial="differential", readonly=state["readonly"])
        self.queue = Virtqueue(self.memory, 0, blk.QUEUE_SIZE)
        self.queue.size = SIZE
        self.queue.desc_address, self.queue.driver_address, self.queue.device_address = DESC, AVAIL, USED
        self.queue.activate(event_idx=state["event_idx"], indirect=state["indirect"])
        self.queue.last_avail = self.queue.used_idx = state["start"]
        with blk_requests(path):
            self.device.activate(Activation(self.memory, (self.queue,), 0, self.used_buffers))
        assert (self.device._compiled is not None) == (path == "compiled")

    def used_buffers(self, queue: Virtqueue) -> None:
        self.interrupts.append(queue.should_interrupt())

    def notify(self) -> str | None:
        try:
            self.device.queue_notify(0)
        except VirtqueueError as err:  # the transport would set NEEDS_RESET
            return str(err)
        return None

    def outcome(self, windows: list[tuple[int, int]]) -> dict:
        return {"memory": [self.memory.read(address, length) for address, length in windows],
                "disk": self.file.read_bytes(), "last_avail": self.queue.last_avail,
                "used_idx": self.queue.used_idx, "requests": self.device.requests,
                "errors": self.device.errors, "interrupts": self.interrupts,
                "reported": covered(self.reports + self.native_reports)}

    def close(self) -> None:
        self.device.close()
        self.queue.reset()
        self.memory.close()


def native_listener(memory: GuestMemory, reports: list[tuple[int, int]]):
    """A NativeWriteListener whose C function records each range, as a guest address and length,
    in `reports`; it numbers RAM its own way (region i from (i + 1) << 40). A range that is not
    inside one region in that numbering is recorded as it came, where no guest RAM is, so that
    it differs from what the Python path reports. Returns the listener with what must stay
    alive while it is used."""
    region_starts = tuple((i + 1) << 40 for i in range(len(memory.regions)))

    def wrote(context, start, end):
        for region, region_start in zip(memory.regions, region_starts, strict=True):
            if region_start <= start <= end <= region_start + region.size:
                reports.append((region.guest_address + start - region_start, end - start))
                return
        reports.append((start, end - start))

    ffi = FFI()  # (not the module's: where it was not built, the compiled runs skip, the Python ones run)
    function = ffi.callback("void (*)(void *, uint64_t, uint64_t)", wrote)
    address = int(ffi.cast("uintptr_t", function))
    return NativeWriteListener(address, 0, region_starts), function


def covered(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (address, length) runs of guest RAM that `ranges` cover together."""
    runs: list[list[int]] = []
    for address, length in sorted(ranges):
        if length == 0:
            continue
        if runs and address <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], address + length)
        else:
            runs.append([address, address + length])
    return [(start, end - start) for start, end in runs]


def both_paths(tmp_path, state: dict, notifications: int = 1, memory_size: int = MEMORY_SIZE,
               windows: list[tuple[int, int]] | None = None) -> dict:
    """The outcome of `notifications` kicks through each path; asserts they are the same.
    (What the compiled path reported through Python's listener is in "python_reports".)"""
    outcomes = {}
    for path in ("compiled", "python"):
        run = Run(path, tmp_path, state, memory_size)
        try:
            broken = [run.notify() for _ in range(notifications)]
            outcomes[path] = {"broken": broken, **run.outcome(windows or [(0, memory_size)])}
            if path == "compiled":
                python_reports = run.reports
        finally:
            run.close()
    assert outcomes["compiled"] == outcomes["python"]
    return {**outcomes["python"], "python_reports": python_reports}


def encode(entries: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(struct.pack("<QIHH", *entry) for entry in entries)


def make_state(*, headers, heads, changes=(), avail_idx=None, start=0, event_idx=True, indirect=True,
               readonly=False, image_readonly=False, listening="python") -> dict:
    table, tables = list(LAYOUT), [list(t) for t in TABLES]
    for where, field, value in changes:
        entries, index = (table, where) if where < SIZE else (tables[where % 2], (where - SIZE) % len(tables[where % 2]))
        entry = list(entries[index])
        entry[field] = [ADDRESSES, LENGTHS, range(8), range(SIZE + 2)][field][value % [13, 13, 8, SIZE + 2][field]]
        entries[index] = tuple(entry)
    memory = bytearray(os.urandom(0x20000))  # data, and headers' ioprio fields, at random
    memory[DESC:DESC + 16 * SIZE] = encode(table)
    for i, entries in enumerate(tables):
        memory[TABLE + 0x100 * i:TABLE + 0x100 * i + 16 * len(entries)] = encode(entries)
    for i, (kind, sector) in enumerate(headers):
        struct.pack_into("<I", memory, HEADER + 32 * i, kind)
        struct.pack_into("<Q", memory, HEADER + 32 * i + 8, sector)
    memory[AVAIL:USED + 6 + 8 * SIZE] = bytes(USED + 6 + 8 * SIZE - AVAIL)
    for i, head in enumerate(heads):
        struct.pack_into("<H", memory, AVAIL + 4 + 2 * ((start + i) % SIZE), head)
    struct.pack_into("<H", memory, AVAIL + 2, (start + len(heads) if avail_idx is None else avail_idx) & 0xFFFF)
    struct.pack_into("<H", memory, AVAIL + 4 + 2 * SIZE, (start + len(heads) // 2) & 0xFFFF)  # used_event
    return {"memory": bytes(memory), "disk": os.urandom(DISK_SECTORS * blk.SECTOR_SIZE), "start": start,
            "event_idx": event_idx, "indirect": indirect, "readonly": readonly, "image_readonly": image_readonly,
            "listening": listening}


WELL_FORMED = [0, 3, 6, 10, 11, 12, 14]
GOOD_HEADERS = [(blk.T_IN, 8), (blk.T_OUT, 16), (blk.T_IN, DISK_SECTORS - 1), (blk.T_FLUSH, 0)]


# What WELL_FORMED's requests write: five status bytes, a 4 KiB read, a 512-byte read and its status byte.
WELL_FORMED_WRITES = [(STATUS + 16 * i, 1) for i in range(5)] + [(DATA, 4096), (DATA + 0x4000, 512),
                                                                 (DATA + 0x4800, 1)]


@pytest.mark.parametrize("listening", ["python", "native", "native elsewhere", None])
def test_well_formed_requests_give_the_same_guest_memory_used_ring_and_disk(tmp_path, listening):
    """And the same writes reported: through Python's listener, or (compiled, on the thread that
    may call it) the listener's C function alone."""
    state = make_state(headers=GOOD_HEADERS, heads=WELL_FORMED * 2, listening=listening)
    outcome = both_paths(tmp_path, state)
    assert outcome["broken"] == [None] and outcome["used_idx"] == 2 * len(WELL_FORMED)
    assert outcome["requests"] == 14 and outcome["reported"] == (WELL_FORMED_WRITES if listening else [])
    assert (outcome["python_reports"] == []) == (listening in ("native", None))


def test_a_full_report_of_written_ranges_is_handed_over_and_the_drain_goes_on(tmp_path, monkeypatch):
    # Room for one chain's writable buffers and status byte (at most the queue's size), no more.
    monkeypatch.setattr(blk_requests_module, "WRITTEN_CAPACITY", SIZE + 1)
    outcome = both_paths(tmp_path, make_state(headers=GOOD_HEADERS, heads=WELL_FORMED * 2))
    assert outcome["used_idx"] == 2 * len(WELL_FORMED) and outcome["reported"] == WELL_FORMED_WRITES
    assert len(outcome["python_reports"]) == 18  # each buffer and status byte of the 14 requests


def test_the_c_function_hears_of_adjacent_buffers_as_one_range(tmp_path):
    """A read into pages that follow each other (as a user buffer's often do) is one call,
    in the listener's own numbering of RAM; the Python listener hears of each buffer."""
    state = make_state(headers=GOOD_HEADERS, heads=[10], listening="native")
    memory = bytearray(state["memory"])
    # Head 10's table: a read (header 0) into DATA + 0x8000 and the 2 KiB that follow.
    struct.pack_into("<I", memory, HEADER + 96, blk.T_IN)
    struct.pack_into("<Q", memory, TABLE + 16 * 2, DATA + 0x8800)
    state["memory"] = bytes(memory)
    run = Run("compiled", tmp_path, state)
    try:
        assert run.notify() is None
        assert run.native_reports == [(DATA + 0x8000, 4096), (STATUS + 48, 1)] and run.reports == []
    finally:
        run.close()


def test_the_compiled_path_carries_requests_out_without_pythons_handler(tmp_path, monkeypatch):
    """IN, OUT and FLUSH never reach VirtioBlock._handle; GET_ID and a bad sector do, one each."""
    handled = []
    original = VirtioBlock._handle
    monkeypatch.setattr(VirtioBlock, "_handle", lambda self, chain: handled.append(chain.head) or original(self, chain))
    headers = [(blk.T_IN, 8), (blk.T_OUT, 16), (blk.T_GET_ID, 0), (blk.T_IN, DISK_SECTORS)]
    run = Run("compiled", tmp_path, make_state(headers=headers, heads=[0, 3, 6, 10, 11, 14]))
    try:
        assert run.notify() is None
        assert handled == [6, 10]  # GET_ID (header 2), and a read at the disk's end (header 3)
        assert run.queue.used_idx == 6 and run.device.requests == 6 and run.device.errors == 1
        assert run.memory.read(DATA, 4096) == run.file.read_bytes()[8 * 512:8 * 512 + 4096]
    finally:
        run.close()


def test_a_module_built_from_another_source_is_not_used(tmp_path, monkeypatch):
    with blk_requests("compiled"):  # (skipped where none was built)
        pass
    assert blk_requests_module.compiled_requests_built()
    monkeypatch.setattr(blk_requests_module, "source_digest", lambda: blk_requests_module.lib.BLK_REQUESTS_DIGEST + 1)
    assert not blk_requests_module.use_compiled_requests()


def test_the_longest_transfer_is_blks_on_both_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(blk, "MAX_TRANSFER", 2048)  # (read at activation, and by _range)
    outcome = both_paths(tmp_path, make_state(headers=GOOD_HEADERS, heads=[0, 3]))
    assert outcome["errors"] == 1 and outcome["requests"] == 2  # the 4 KiB read fails, the 1 KiB write not


@pytest.mark.parametrize("event_idx", [False, True])
def test_many_kicks_across_the_16_bit_index_wrap(tmp_path, event_idx):
    state = make_state(headers=GOOD_HEADERS, heads=WELL_FORMED + [0, 3], start=0xFFFA, event_idx=event_idx)
    outcome = both_paths(tmp_path, state, notifications=3)
    assert outcome["used_idx"] == (0xFFFA + 9) & 0xFFFF and outcome["interrupts"][1:] == [False, False]


@pytest.mark.parametrize("readonly", ["device", "image"])
def test_a_read_only_disk_refuses_writes_on_both_paths(tmp_path, readonly):
    state = make_state(headers=GOOD_HEADERS, heads=[3, 0, 12], readonly=readonly == "device",
                       image_readonly=readonly == "image")
    outcome = both_paths(tmp_path, state)
    assert outcome["broken"] == [None] and outcome["requests"] == 3


def test_the_avail_index_run_ahead_breaks_the_queue_on_both_paths(tmp_path):
    outcome = both_paths(tmp_path, make_state(headers=GOOD_HEADERS, heads=[0, 3], avail_idx=SIZE + 1))
    assert "ahead" in outcome["broken"][0] and outcome["used_idx"] == 0


@pytest.mark.parametrize("listening", ["python", "native"])
def test_buffers_in_high_ram_and_across_the_end_of_low_ram(tmp_path, listening):
    """Guest RAM in two regions: a read into high RAM is carried out (and reported in high
    RAM's own numbering to the listener's C function), a buffer running past low RAM's end
    breaks the queue, the same on both paths."""
    size = MMIO_HOLE_START + (1 << 20)  # (MAP_NORESERVE: only the pages touched cost anything)
    high = HIGH_RAM_START + 0x1000
    state = make_state(headers=GOOD_HEADERS, heads=[0, 3], listening=listening)
    memory = bytearray(state["memory"])
    struct.pack_into("<Q", memory, DESC + 16 * 1, high)                    # head 0 reads into high RAM
    struct.pack_into("<Q", memory, DESC + 16 * 4, MMIO_HOLE_START - 512)   # head 3's 1 KiB runs past low RAM
    state["memory"] = bytes(memory)
    outcome = both_paths(tmp_path, state, memory_size=size,
                         windows=[(0, 0x20000), (MMIO_HOLE_START - 4096, 4096), (high - 4096, 3 * 4096)])
    assert outcome["used_idx"] == 1 and "not in guest RAM" in outcome["broken"][0]
    assert outcome["memory"][2][4096:8192] == state["disk"][8 * 512:8 * 512 + 4096]
    assert outcome["reported"] == [(STATUS, 1), (high, 4096)]


def test_adjacent_buffers_in_two_regions_are_a_range_in_each(tmp_path):
    """Firmware's last page and high RAM meet at 4 GiB but are two regions, numbered apart by
    the listener: a read into the end of one and the start of the other is two ranges."""
    state = make_state(headers=GOOD_HEADERS, heads=[10], listening="native")
    memory = bytearray(state["memory"])
    # Head 10's table: a read (header 3) into the firmware page's last 2 KiB and high RAM's first.
    struct.pack_into("<I", memory, HEADER + 96, blk.T_IN)
    struct.pack_into("<Q", memory, TABLE + 16 * 1, HIGH_RAM_START - 2048)
    struct.pack_into("<Q", memory, TABLE + 16 * 2, HIGH_RAM_START)
    state["memory"] = bytes(memory)
    run = Run("compiled", tmp_path, state, MMIO_HOLE_START + (1 << 20), firmware_page=HIGH_RAM_START - 4096)
    try:
        assert run.notify() is None
        assert run.memory.read(HIGH_RAM_START - 2048, 2048) + run.memory.read(HIGH_RAM_START, 2048) == \
            state["disk"][:4096]
        assert run.native_reports == [(HIGH_RAM_START - 2048, 2048), (HIGH_RAM_START, 2048), (STATUS + 48, 1)]
    finally:
        run.close()


LONG_TABLE = TABLE + 0x200  # (room for SIZE + 1 entries)
IN_4K = [(HEADER, 16, R, 1), (DATA, 4096, W, 2), (STATUS, 1, DESC_F_WRITE, 0)]  # header 0 reads 4 KiB
# Each a chain from head 0, and what is in the indirect table at LONG_TABLE.
EDGES = {
    "loop": ([(HEADER, 16, R, 1), (DATA, 4096, W, 2), (STATUS, 1, W, 1)], []),
    "next beyond the table": ([(HEADER, 16, R, 1), (DATA, 4096, W, SIZE)], []),
    "readable after writable": ([(HEADER, 16, R, 1), (DATA, 4096, W, 2), (STATUS, 1, 0, 0)], []),
    "buffer past the end of RAM": ([(HEADER, 16, R, 1), (MEMORY_SIZE - 2048, 4096, W, 2), (STATUS, 1, DESC_F_WRITE, 0)], []),
    "empty buffer at the end of RAM": ([(HEADER, 16, R, 1), (MEMORY_SIZE, 0, W, 2), (STATUS, 1, DESC_F_WRITE, 0)], []),
    "empty buffer after the status byte": ([(HEADER, 16, R, 1), (STATUS, 1, W, 2), (DATA, 0, DESC_F_WRITE, 0)], []),
    "no status byte": ([(HEADER, 16, R, 1), (DATA, 0, DESC_F_WRITE, 0)], []),
    "header of 15 bytes": ([(HEADER, 15, R, 1), (STATUS, 1, DESC_F_WRITE, 0)], []),
    "header in three pieces": ([(HEADER, 5, R, 1), (HEADER + 5, 5, R, 2), (HEADER + 10, 6, R, 3),
                                (DATA, 4096, W, 4), (STATUS, 1, DESC_F_WRITE, 0)], []),
    "indirect": ([(LONG_TABLE, 48, DESC_F_INDIRECT, 0)], IN_4K),
    "indirect with next": ([(LONG_TABLE, 48, DESC_F_INDIRECT | DESC_F_NEXT, 1), (STATUS, 1, DESC_F_WRITE, 0)], IN_4K),
    "indirect after a buffer": ([(HEADER, 16, R, 1), (LONG_TABLE, 32, DESC_F_INDIRECT, 0)],
                                [(DATA, 4096, W, 1), (STATUS, 1, DESC_F_WRITE, 0)]),
    "nested indirect": ([(LONG_TABLE, 48, DESC_F_INDIRECT, 0)], [(LONG_TABLE, 48, DESC_F_INDIRECT, 0)]),
    "indirect table of 40 bytes": ([(LONG_TABLE, 40, DESC_F_INDIRECT, 0)], IN_4K),
    "empty indirect table": ([(LONG_TABLE, 0, DESC_F_INDIRECT, 0)], IN_4K),
    "indirect table longer than the queue": ([(LONG_TABLE, 16 * (SIZE + 1), DESC_F_INDIRECT, 0)],
                                             IN_4K[:1] + [(DATA + 512 * i, 512, W, i + 2) for i in range(SIZE - 1)]
                                             + [(STATUS, 1, DESC_F_WRITE, 0)]),
    "next beyond the indirect table": ([(LONG_TABLE, 32, DESC_F_INDIRECT, 0)], [(HEADER, 16, R, 1), (DATA, 4096, W, 2),
                                                                              (STATUS, 1, DESC_F_WRITE, 0)]),
    "indirect table past the end of RAM": ([(MEMORY_SIZE - 32, 48, DESC_F_INDIRECT, 0)], []),
}


@pytest.mark.parametrize("indirect", [True, False])
@pytest.mark.parametrize("edge", EDGES)
def test_edge_chains_give_the_same_outcome(tmp_path, edge, indirect):
    """A well-formed read broken one way at a time (and a few unusual ones that are allowed)."""
    chain, table = EDGES[edge]
    state = make_state(headers=GOOD_HEADERS, heads=[0, 3], indirect=indirect)
    memory = bytearray(state["memory"])
    # What lies just past each table reads as a good last descriptor, so that a walk that
    # ran past a table's end would carry the request out.
    for address, entries in ((DESC, chain + LAYOUT[len(chain):]), (LONG_TABLE, table)):
        memory[address:address + 16 * (len(entries) + 1)] = encode(entries + [(STATUS, 1, DESC_F_WRITE, 0)])
    state["memory"] = bytes(memory)
    both_paths(tmp_path, state)


@fuzz_settings(300)
@given(changes=st.lists(st.tuples(st.integers(0, SIZE + 7), st.integers(0, 3), st.integers(0, 12)), max_size=4),
       headers=st.lists(st.tuples(st.sampled_from(TYPES), st.sampled_from(SECTORS)), min_size=4, max_size=4),
       heads=st.lists(st.one_of(st.sampled_from(WELL_FORMED), st.integers(0, SIZE + 1)), max_size=SIZE + 2),
       avail_ahead=st.sampled_from([None, None, None, 0, SIZE, SIZE + 1, 0x8000]),
       start=st.sampled_from([0, 5, 0xFFFE]), flags=st.integers(0, 63))
def test_fuzz_the_compiled_and_python_paths_agree(tmp_path, changes, headers, heads, avail_ahead, start, flags):
    state = make_state(headers=headers, heads=heads[:SIZE] if avail_ahead is None else heads, changes=changes,
                       avail_idx=None if avail_ahead is None else start + avail_ahead, start=start,
                       event_idx=bool(flags & 1), indirect=bool(flags & 2), readonly=bool(flags & 4),
                       image_readonly=bool(flags & 8),
                       listening=["python", "native", "native elsewhere", None][flags >> 4])
    both_paths(tmp_path, state, notifications=2)
