"""Split virtqueues on their own: chain walking, validation, event-index suppression, fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.virtio import queue as queue_module
from devices.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    IN_ORDER_CHECK_MIN,
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
)
from tests.fuzzing import fuzz_settings
from vmm.memory import GuestMemory

SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
DATA = 0x10000
MEMORY = GuestMemory(1 << 20)


def fresh_queue(event_idx: bool = False, indirect: bool = True, size: int = SIZE) -> Virtqueue:
    MEMORY.fill(0, 0x10000)
    queue = Virtqueue(MEMORY, 0, size)
    queue.size = size
    queue.desc_address, queue.driver_address, queue.device_address = DESC, AVAIL, USED
    queue.activate(event_idx=event_idx, indirect=indirect)
    return queue


def descriptor(index: int, address: int, length: int, flags: int = 0, following: int = 0, table: int = DESC):
    MEMORY.write(table + 16 * index, struct.pack("<QIHH", address, length, flags, following))


def make_available(*heads: int, start: int = 0) -> None:
    for i, head in enumerate(heads):
        MEMORY.write_u16(AVAIL + 4 + 2 * ((start + i) % SIZE), head)
    MEMORY.write_u16(AVAIL + 2, (start + len(heads)) & 0xFFFF)


def test_chain_with_readable_and_writable_parts():
    queue = fresh_queue()
    descriptor(0, DATA, 16, DESC_F_NEXT, 3)
    descriptor(3, DATA + 100, 512, DESC_F_NEXT | DESC_F_WRITE, 5)
    descriptor(5, DATA + 700, 1, DESC_F_WRITE)
    make_available(0)
    chain = queue.pop()
    assert chain == DescriptorChain(0, [(DATA, 16)], [(DATA + 100, 512), (DATA + 700, 1)])
    assert queue.pop() is None


@pytest.mark.parametrize(("offset", "length", "pieces"), [
    (0, None, [(DATA, 16), (DATA + 100, 0), (DATA + 200, 512), (DATA + 800, 1)]),
    (16, 512, [(DATA + 200, 512)]),                    # a request's data: header and status cut off whole
    (0, 15, [(DATA, 15)]),
    (10, 10, [(DATA + 10, 6), (DATA + 200, 4)]),      # across the empty buffer
    (20, 600, [(DATA + 204, 508), (DATA + 800, 1)]),  # never beyond the end
    (528, None, [(DATA + 800, 1)]),
    (529, None, []),
    (600, 5, []),
])
def test_ranges_cut_the_stream_the_buffers_form(offset, length, pieces):
    chain = DescriptorChain(0, [(DATA, 16), (DATA + 100, 0), (DATA + 200, 512), (DATA + 800, 1)])
    assert chain.readable_length == 529
    assert chain.readable_ranges(offset, length) == [(a, n) for a, n in pieces if n]


@pytest.mark.parametrize(("writable", "last"), [
    ([(DATA, 512), (DATA + 700, 1)], DATA + 700),
    ([(DATA, 512), (DATA + 700, 4), (DATA + 900, 0)], DATA + 703),  # empty buffers carry nothing
    ([(DATA, 0)], None),
    ([], None),
])
def test_the_last_writable_byte_is_where_a_status_byte_goes(writable, last):
    assert DescriptorChain(0, [(DATA, 16)], writable).last_writable_byte() == last


def test_reading_the_stream_within_its_first_buffer_or_across_buffers():
    MEMORY.write(DATA, bytes(range(64)))
    chain = DescriptorChain(0, [(DATA, 16), (DATA + 32, 0), (DATA + 48, 16)])
    assert chain.read(MEMORY, 4, 8) == bytes(range(4, 12))
    assert chain.read(MEMORY, 12, 8) == bytes(range(12, 16)) + bytes(range(48, 52))
    assert chain.read(MEMORY, 30, 10) == bytes(range(62, 64))  # never beyond the end
    assert chain.read(MEMORY) == bytes(range(16)) + bytes(range(48, 64))


def test_a_queue_enabled_again_uses_its_new_areas():
    queue = fresh_queue()
    descriptor(0, DATA, 4)
    make_available(0)
    assert queue.pop().readable == [(DATA, 4)]
    queue.push(0, 4)
    # The driver disables the queue, moves it elsewhere and enables it again.
    queue.ready = False
    queue.desc_address, queue.driver_address, queue.device_address = 0x5000, 0x6000, 0x7000
    queue.last_avail = queue.used_idx = 0
    queue.activate(event_idx=False, indirect=True)
    MEMORY.write(0x5000, struct.pack("<QIHH", DATA + 64, 8, 0, 0))
    MEMORY.write_u16(0x6000 + 4, 0)
    MEMORY.write_u16(0x6000 + 2, 1)
    assert queue.pop().readable == [(DATA + 64, 8)]
    queue.push(0, 8)
    assert MEMORY.read_u16(0x7000 + 2) == 1 and MEMORY.read(0x7000 + 4, 8) == struct.pack("<II", 0, 8)
    assert MEMORY.read_u16(USED + 2) == 1  # the old device area saw only the first request


def test_push_writes_used_element_then_index():
    queue = fresh_queue()
    queue.push(5, 123)
    queue.push(2, 7)
    assert MEMORY.read_u16(USED + 2) == 2
    assert struct.unpack("<IIII", MEMORY.read(USED + 4, 16)) == (5, 123, 2, 7)


@pytest.mark.parametrize("case", [
    "loop", "self-loop", "outside-ram", "head-beyond-size", "next-beyond-size", "read-after-write",
    "indirect-in-indirect", "indirect-with-next", "indirect-bad-length", "indirect-outside-ram",
    "indirect-too-long", "indirect-after-direct", "index-jump",
])
def test_malformed_chains_are_refused(case):
    queue = fresh_queue()
    head = 0
    if case == "loop":
        descriptor(0, DATA, 4, DESC_F_NEXT, 1)
        descriptor(1, DATA, 4, DESC_F_NEXT, 0)
    elif case == "self-loop":
        descriptor(0, DATA, 4, DESC_F_NEXT, 0)
    elif case == "outside-ram":
        descriptor(0, (1 << 20) - 8, 16)
    elif case == "head-beyond-size":
        head = SIZE
    elif case == "next-beyond-size":
        descriptor(0, DATA, 4, DESC_F_NEXT, SIZE)
    elif case == "read-after-write":
        descriptor(0, DATA, 4, DESC_F_NEXT | DESC_F_WRITE, 1)
        descriptor(1, DATA, 4)
    elif case == "indirect-in-indirect":
        descriptor(0, DATA, 32, DESC_F_INDIRECT)
        descriptor(0, DATA + 64, 4, DESC_F_NEXT, 1, table=DATA)
        descriptor(1, DATA + 128, 16, DESC_F_INDIRECT, table=DATA)
    elif case == "indirect-with-next":
        descriptor(0, DATA, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
        descriptor(0, DATA + 64, 4, table=DATA)
    elif case == "indirect-bad-length":
        descriptor(0, DATA, 20, DESC_F_INDIRECT)
    elif case == "indirect-outside-ram":
        descriptor(0, (1 << 20) - 16, 32, DESC_F_INDIRECT)
    elif case == "indirect-too-long":
        descriptor(0, DATA, 16 * (SIZE + 1), DESC_F_INDIRECT)
    elif case == "indirect-after-direct":
        descriptor(0, DATA + 64, 4, DESC_F_NEXT, 1)
        descriptor(1, DATA, 16, DESC_F_INDIRECT)
        descriptor(0, DATA + 64, 4, table=DATA)
    make_available(head)
    if case == "index-jump":
        MEMORY.write_u16(AVAIL + 2, SIZE + 1)
    with pytest.raises(VirtqueueError):
        queue.pop()


def test_loop_inside_an_indirect_table_is_refused():
    queue = fresh_queue()
    descriptor(0, DATA, 32, DESC_F_INDIRECT)
    descriptor(0, DATA + 64, 4, DESC_F_NEXT, 1, table=DATA)
    descriptor(1, DATA + 64, 4, DESC_F_NEXT, 0, table=DATA)
    make_available(0)
    with pytest.raises(VirtqueueError):
        queue.pop()


def test_full_length_chain_is_accepted():
    queue = fresh_queue()
    for i in range(SIZE):
        descriptor(i, DATA + 8 * i, 8, DESC_F_NEXT if i + 1 < SIZE else 0, i + 1)
    make_available(0)
    assert len(queue.pop().readable) == SIZE


def test_indices_wrap_around_16_bits():
    queue = fresh_queue()
    queue.last_avail = 0xFFFF
    descriptor(1, DATA, 4)
    MEMORY.write_u16(AVAIL + 4 + 2 * (0xFFFF % SIZE), 1)
    MEMORY.write_u16(AVAIL + 2, 0)
    assert queue.pop().head == 1
    assert queue.last_avail == 0


def test_without_event_idx_no_interrupt_flag_is_honoured():
    queue = fresh_queue()
    queue.push(0, 0)
    assert queue.should_interrupt()
    MEMORY.write_u16(AVAIL, 1)  # VRING_AVAIL_F_NO_INTERRUPT
    queue.push(0, 0)
    assert not queue.should_interrupt()
    assert not queue.should_interrupt()  # nothing new used


def test_event_idx_interrupts_only_when_used_event_is_crossed():
    queue = fresh_queue(event_idx=True)
    used_event = AVAIL + 4 + 2 * SIZE
    MEMORY.write_u16(used_event, 2)  # "interrupt me when entry 2 is used"
    queue.push(0, 0)  # used idx 1: entry 0 used
    assert not queue.should_interrupt()
    queue.push(0, 0)  # entry 1
    assert not queue.should_interrupt()
    queue.push(0, 0)  # entry 2: crossed
    assert queue.should_interrupt()
    queue.push(0, 0)
    assert not queue.should_interrupt()  # used_event is behind now
    # A batch that jumps over used_event still interrupts once.
    MEMORY.write_u16(used_event, 5)
    queue.push(0, 0)
    queue.push(0, 0)
    queue.push(0, 0)
    assert queue.should_interrupt()


def test_event_idx_publishes_avail_event_when_the_queue_runs_dry():
    queue = fresh_queue(event_idx=True)
    avail_event = USED + 4 + 8 * SIZE
    descriptor(0, DATA, 4)
    make_available(0, 0, 0)
    for _ in range(3):
        assert queue.pop() is not None
    assert queue.pop() is None
    assert MEMORY.read_u16(avail_event) == 3


# -- fuzzing -----------------------------------------------------------------------

descriptors = st.tuples(
    st.one_of(st.integers(0, (1 << 20) + 4096), st.integers(0, (1 << 64) - 1)),  # address
    st.one_of(st.integers(0, 256), st.integers(0, (1 << 32) - 1)),  # length
    st.integers(0, 7),  # flags: NEXT, WRITE, INDIRECT in any mix
    st.integers(0, SIZE + 2),  # next
)


@fuzz_settings(400)
@given(
    table=st.lists(descriptors, min_size=SIZE, max_size=SIZE),
    indirect_table=st.lists(descriptors, min_size=0, max_size=SIZE + 2),
    heads=st.lists(st.integers(0, SIZE + 1), min_size=1, max_size=SIZE),
    avail_idx=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
)
def test_fuzz_random_descriptor_tables(table, indirect_table, heads, avail_idx, event_idx):
    """Whatever the driver wrote, pop() returns a well-formed chain, None, or VirtqueueError."""
    queue = fresh_queue(event_idx=event_idx)
    for i, (address, length, flags, following) in enumerate(table):
        if flags & DESC_F_INDIRECT and address % 3 == 0:
            address, length = DATA, 16 * len(indirect_table)  # point some at a real table
        descriptor(i, address, length & 0xFFFF_FFFF, flags, following)
    for i, (address, length, flags, following) in enumerate(indirect_table):
        descriptor(i, address, length & 0xFFFF_FFFF, flags, following, table=DATA)
    make_available(*heads)
    if avail_idx is not None:
        MEMORY.write_u16(AVAIL + 2, avail_idx)
    for _ in range(SIZE + 1):
        try:
            chain = queue.pop()
        except VirtqueueError:
            break
        if chain is None:
            break
        buffers = chain.readable + chain.writable
        assert 1 <= len(buffers) <= SIZE
        assert all(MEMORY.contains(address, length) for address, length in buffers)
        assert chain.head < SIZE
        # Reading and writing through a validated chain never leaves guest RAM.
        chain.read(MEMORY, 0, min(chain.readable_length, 4096))
        chain.write(MEMORY, bytes(min(chain.writable_length, 4096)))
        queue.push(chain, 0)


# -- long indirect tables: checked whole when they run in order (queue._in_order) --------

LONG = 40  # descriptors: above queue.IN_ORDER_CHECK_MIN
TABLE = DATA + 0x8000


def long_table(entries: list[tuple[int, int, int, int]]) -> Virtqueue:
    queue = fresh_queue(size=64)
    for i, entry in enumerate(entries):
        descriptor(i, *entry, table=TABLE)
    descriptor(0, TABLE, 16 * len(entries), DESC_F_INDIRECT)
    make_available(0)
    return queue


def linux_request(data_buffers: int = LONG - 2) -> list[tuple[int, int, int, int]]:
    """A read as Linux lays it out: header, data pages in descending order, status byte."""
    pages = [(DATA + 0x1000 * (data_buffers - i), 0x200, DESC_F_NEXT | DESC_F_WRITE, 2 + i)
             for i in range(data_buffers)]
    return [(DATA, 16, DESC_F_NEXT, 1), *pages, (DATA + 0x40, 1, DESC_F_WRITE, 0)]


def test_a_long_table_in_order_gives_the_chain_a_walk_gives(monkeypatch):
    entries = linux_request()
    checked_whole = []
    in_order = queue_module._in_order
    monkeypatch.setattr(queue_module, "_in_order", lambda *args: checked_whole.append(in_order(*args)) or
                        checked_whole[-1])
    chain = long_table(entries).pop()
    assert checked_whole == [chain]  # the table was checked whole, and that gave the chain
    monkeypatch.setattr(queue_module, "IN_ORDER_CHECK_MIN", 1 << 20)  # descriptor by descriptor
    assert long_table(entries).pop() == chain
    assert chain.readable == [(DATA, 16)]
    assert chain.writable == [(address, length) for address, length, _, _ in entries[1:]]
    assert (chain.readable_length, chain.writable_length) == (16, 0x200 * (LONG - 2) + 1)


@pytest.mark.parametrize("fault", ["outside-ram", "readable-after-writable", "nested-indirect", "loop"])
def test_a_long_table_in_order_with_a_fault_is_refused(fault):
    entries = linux_request()
    if fault == "outside-ram":
        entries[5] = (MEMORY.size - 0x100, 0x200, DESC_F_NEXT | DESC_F_WRITE, 6)
    elif fault == "readable-after-writable":
        entries[5] = (DATA + 0x100, 0x200, DESC_F_NEXT, 6)
    elif fault == "nested-indirect":
        entries[5] = (TABLE, 16 * 4, DESC_F_INDIRECT | DESC_F_NEXT, 6)
    else:
        entries[-1] = (DATA + 0x40, 1, DESC_F_NEXT | DESC_F_WRITE, 1)
    with pytest.raises(VirtqueueError):
        long_table(entries).pop()


@fuzz_settings(300)
@given(size=st.integers(IN_ORDER_CHECK_MIN + 1, 62),
       changes=st.lists(st.tuples(st.integers(0, 61), st.integers(0, 3), st.integers(0, 7)), max_size=3))
def test_fuzz_long_tables_give_what_a_walk_descriptor_by_descriptor_gives(size, changes):
    """Linux's layout with a few fields changed (a buffer moved beyond RAM or made empty,
    other flags, a next that skips or goes back): the table checked whole and the walk
    agree on every one, chain or refusal."""
    table = linux_request(size - 2)
    for index, field, value in changes:
        address, length, flags, following = table[index % size]
        if field == 0:
            address = (DATA, DATA + 0x4000, MEMORY.size - 0x100, 1 << 40)[value % 4]
        elif field == 1:
            length = (0, 1, 0x200, 0x10000)[value % 4]
        elif field == 2:
            flags = value
        else:
            following = max(index % size + value - 3, 0)
        table[index % size] = (address, length, flags, following)

    def pop():
        try:
            return long_table(table).pop()
        except VirtqueueError:
            return "refused"

    checked_whole = pop()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(queue_module, "IN_ORDER_CHECK_MIN", 1 << 20)
        assert pop() == checked_whole
