"""Split virtqueues (virtio 1.x, 2.7): taking descriptor chains and returning used buffers.

Three areas in guest RAM, placed by the driver:

    descriptor table  size x {addr u64, len u32, flags u16, next u16}
    driver area       {flags u16, idx u16, ring[size] u16, used_event u16}   ("avail")
    device area       {flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16}   ("used")

Everything in them is written by the guest and trusted for nothing. A chain
is walked in full before the device sees it, and refused (`VirtqueueError`)
when a descriptor points outside guest RAM, when it has more descriptors
than the queue has entries (which is also how a loop shows up), when a
device-readable descriptor follows a device-writable one, when an indirect
table is malformed or holds another indirect descriptor, or when the driver
moved its index further than the queue is long. The transport turns that
error into NEEDS_RESET for the device; the VMM carries on.

With VIRTIO_RING_F_EVENT_IDX the two sides tell each other where they want
to be woken: the device publishes `avail_event` (notify me when you make
this entry available) and interrupts only when its used index passes the
driver's `used_event`.
"""

from __future__ import annotations

import struct
import sys
import threading
from array import array
from dataclasses import dataclass, field
from operator import add

from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory

DESCRIPTOR_SIZE = 16
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

_DESCRIPTOR = struct.Struct("<QIHH")
_USED_ELEMENT = struct.Struct("<II")
_U16 = struct.Struct("<H")

# A split queue's size is a power of two no larger than this (2.7, "Queue Size").
MAX_QUEUE_SIZE = 32768
# An indirect table longer than this (a 1 MiB request's is 256 descriptors) is first checked
# whole, column by column, for the layout Linux gives every table (`_in_order`); below it a
# walk descriptor by descriptor is as fast.
IN_ORDER_CHECK_MIN = 16


class VirtqueueError(Exception):
    """The driver broke the queue's rules; the device needs a reset."""


_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """Order this thread's earlier stores to guest RAM before its later loads.

    The event-index protocol needs it (publish avail_event, then re-read the
    driver's index; publish the used index, then read used_event), and x86
    may otherwise let the load pass the store. Python has no fence, but a
    lock round trip executes a locked read-modify-write instruction, which
    x86 orders against all earlier stores and later loads.
    """
    with _barrier_lock:
        pass


@dataclass(slots=True)
class DescriptorChain:
    """One request: its head index and its buffers, as (guest address, length) pairs."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    # A chain's buffers do not change once walked (a 1 MiB request has 256 of them): the
    # walk counts their bytes as it goes; a chain made by hand has them summed here.
    readable_length: int = field(default=-1, compare=False)
    writable_length: int = field(default=-1, compare=False)

    def __post_init__(self) -> None:
        if self.readable_length < 0:
            self.readable_length = sum(length for _, length in self.readable)
        if self.writable_length < 0:
            self.writable_length = sum(length for _, length in self.writable)

    def readable_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """The (guest address, length) pieces of `length` bytes (default: all) of the
        device-readable stream from `offset`."""
        return _pieces(self.readable, self.readable_length, offset, length)

    def writable_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """The same for the device-writable stream."""
        return _pieces(self.writable, self.writable_length, offset, length)

    def read(self, memory: GuestMemory, offset: int = 0, length: int | None = None) -> bytes:
        """`length` bytes (default: all) of the device-readable buffers, as one stream, from `offset`."""
        if self.readable and length is not None and 0 <= offset and 0 <= length:
            address, size = self.readable[0]
            if offset + length <= size:  # all in the first buffer: a request's header, usually
                return memory.read(address + offset, length)
        return b"".join(memory.read(address, count) for address, count in self.readable_ranges(offset, length))

    def last_writable_byte(self) -> int | None:
        """The guest address of the device-writable stream's last byte (a virtio-blk status
        byte), None if the stream is empty."""
        for address, size in reversed(self.writable):
            if size:
                return address + size - 1
        return None

    def write(self, memory: GuestMemory, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter `data` into the device-writable buffers from stream position `offset`; returns bytes written."""
        view = memoryview(data).cast("B")
        ranges = self.writable_ranges(offset, len(view))
        written = 0
        for address, count in ranges:
            memory.write(address, view[written : written + count])
            written += count
        memory.devices_wrote(ranges)  # the software CPU drops code translated from them
        return written


def _pieces(buffers: list[tuple[int, int]], total: int, offset: int, length: int | None) -> list[tuple[int, int]]:
    """Cut the stream of `total` bytes that `buffers` form: `length` bytes (default: to
    the end, and never beyond it) from `offset`, as (address, length) pieces.

    Whole buffers are skipped from the front and dropped from the back, so the usual
    cuts (a request's data between its header and its status byte) need no running
    count through every buffer.
    """
    offset = max(offset, 0)
    end = total if length is None else min(offset + max(length, 0), total)
    if offset >= end:
        return []
    first, last = 0, len(buffers)
    while offset >= buffers[first][1]:
        offset -= buffers[first][1]
        first += 1
    excess = total - end
    while excess >= buffers[last - 1][1]:
        excess -= buffers[last - 1][1]
        last -= 1
    pieces = [piece for piece in buffers[first:last] if piece[1]]  # (empty buffers carry nothing)
    if offset:
        address, size = pieces[0]
        pieces[0] = (address + offset, size - offset)
    if excess:
        address, size = pieces[-1]
        pieces[-1] = (address, size - excess)
    return pieces


def _in_order(head: int, table: bytes, memory: GuestMemory) -> DescriptorChain | None:
    """The chain an indirect table holds, when it runs through the table in order (each
    descriptor's next is the following one, the last has none), device-readable buffers
    first, and all its buffers lie in one stretch of guest RAM; else None, and the walk
    goes descriptor by descriptor (and names what is wrong, if anything is).

    What the walk checks for each descriptor is checked here for the whole table with
    list and array operations, which do not go through the interpreter per descriptor.
    """
    if sys.byteorder != "little":  # the arrays read the table in the host's byte order
        return None
    halves = array("H", table)
    flags, following = halves[6::8], halves[7::8]
    count = len(flags)
    if following[:-1] != array("H", range(1, count)):
        return None
    # The flags must read NEXT for the readable buffers, NEXT | WRITE for the writable ones,
    # and the same without NEXT for the last.
    readable = flags.count(DESC_F_NEXT) + (flags[-1] == 0)
    expected = array("H", [DESC_F_NEXT]) * readable + array("H", [DESC_F_NEXT | DESC_F_WRITE]) * (count - readable)
    expected[-1] &= ~DESC_F_NEXT
    if flags != expected:
        return None
    addresses = array("Q", table)[0::2].tolist()
    lengths = array("I", table)[2::4].tolist()
    start, end = min(addresses), max(map(add, addresses, lengths))
    if not memory.contains(start, end - start):
        return None
    return DescriptorChain(head, list(zip(addresses[:readable], lengths[:readable], strict=True)),
                           list(zip(addresses[readable:], lengths[readable:], strict=True)),
                           sum(lengths[:readable]), sum(lengths[readable:]))


class Virtqueue:
    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        if not (0 < max_size <= MAX_QUEUE_SIZE and max_size & (max_size - 1) == 0):
            raise ValueError(f"queue size {max_size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        # What the driver programs through the transport.
        self.size = self.max_size
        self.ready = False
        self.desc_address = 0
        self.driver_address = 0
        self.device_address = 0
        # Negotiated ring features.
        self.event_idx = False
        self.indirect = False
        # The device's own positions (free-running 16-bit indices).
        self.last_avail = 0
        self.used_idx = 0
        self._used_idx_at_last_check = 0
        # Windows onto the three areas once they are checked (activate): each ring
        # access is then one unpack_from/pack_into, not an address lookup.
        self._release_views()

    def _release_views(self) -> None:
        for view in (getattr(self, name, None) for name in ("_table", "_avail", "_used")):
            if view is not None:
                view.release()
        self._table: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None

    # -- set-up --------------------------------------------------------------

    def activate(self, *, event_idx: bool, indirect: bool) -> None:
        """Check the areas the driver programmed; called when it sets QueueReady."""
        size = self.size
        if not (0 < size <= self.max_size and size & (size - 1) == 0):
            raise VirtqueueError(f"queue {self.index}: size {size} is not a power of two up to {self.max_size}")
        areas = (
            ("descriptor table", self.desc_address, 16, DESCRIPTOR_SIZE * size),
            ("driver area", self.driver_address, 2, 6 + 2 * size),
            ("device area", self.device_address, 4, 6 + 8 * size),
        )
        for name, address, alignment, length in areas:
            if address % alignment:
                raise VirtqueueError(f"queue {self.index}: {name} at {address:#x} is not {alignment}-byte aligned")
            if not self.memory.contains(address, length):
                raise VirtqueueError(f"queue {self.index}: {name} at {address:#x}+{length:#x} is not in guest RAM")
        self.event_idx = event_idx
        self.indirect = indirect
        self._release_views()
        self._table = self.memory.view(self.desc_address, DESCRIPTOR_SIZE * size)
        self._avail = self.memory.view(self.driver_address, 6 + 2 * size)
        self._used = self.memory.view(self.device_address, 6 + 8 * size)
        self.ready = True

    # -- the driver's side: available chains -----------------------------------

    def _avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def _pending(self) -> int:
        pending = (self._avail_idx() - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(f"queue {self.index}: the driver's index moved {pending} entries "
                                 f"ahead on a queue of {self.size}")
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has made none available."""
        if self._pending() == 0:
            if not self.event_idx:
                return None
            # Ask to be notified when the driver makes the next entry
            # available, then look again: it may have done so before
            # it could see the request.
            self._set_avail_event(self.last_avail)
            full_barrier()
            if self._pending() == 0:
                return None
        (head,) = _U16.unpack_from(self._avail, 4 + 2 * (self.last_avail % self.size))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        try:
            return self._walk(head)
        except GuestMemoryError as err:  # buffers are checked, but keep the promise anyway
            raise VirtqueueError(f"queue {self.index}: {err}") from None

    def _set_avail_event(self, value: int) -> None:
        _U16.pack_into(self._used, 4 + 8 * self.size, value)

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise self._chain_error(head, f"head index is beyond the queue size {self.size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        readable_length = writable_length = 0
        contains = self.memory.contains
        unpack = _DESCRIPTOR.unpack_from
        table = self._table
        # Once the chain moves into an indirect table: all its descriptors, unpacked at once
        # (a 1 MiB request is a table of 256).
        indirect: list[tuple[int, int, int, int]] | None = None
        limit = self.size  # descriptors a chain may have; more means a loop
        index, seen = head, 0
        while True:
            seen += 1
            if seen > limit:
                raise self._chain_error(head, f"more than {limit} descriptors (a loop?)")
            if indirect is None:
                address, length, flags, following = unpack(table, DESCRIPTOR_SIZE * index)
            else:
                address, length, flags, following = indirect[index]
            if flags & DESC_F_INDIRECT:
                raw = self._indirect_table(head, indirect is not None, seen, flags, address, length)
                if len(raw) > IN_ORDER_CHECK_MIN * DESCRIPTOR_SIZE:
                    chain = _in_order(head, raw, self.memory)
                    if chain is not None:
                        return chain
                indirect = list(_DESCRIPTOR.iter_unpack(raw))
                limit = len(indirect)
                index, seen = 0, 0
                continue
            if not contains(address, length):
                raise self._chain_error(head, f"buffer {address:#x}+{length:#x} is not in guest RAM")
            if flags & DESC_F_WRITE:
                writable.append((address, length))
                writable_length += length
            elif writable:
                raise self._chain_error(head, "a device-readable buffer follows a device-writable one")
            else:
                readable.append((address, length))
                readable_length += length
            if not flags & DESC_F_NEXT:
                return DescriptorChain(head, readable, writable, readable_length, writable_length)
            index = following
            if index >= limit:
                raise self._chain_error(head, f"next index {index} is beyond the table of {limit}")

    def _chain_error(self, head: int, problem: str) -> VirtqueueError:
        # (The name is made only for an error: a walk per request has no use for it.)
        return VirtqueueError(f"queue {self.index}, chain {head}: {problem}")

    def _indirect_table(self, head: int, nested: bool, position: int, flags: int,
                        address: int, length: int) -> bytes:
        if not self.indirect:
            raise self._chain_error(head, "indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not negotiated")
        if nested:
            raise self._chain_error(head, "an indirect table refers to another indirect table")
        if position != 1 or flags & DESC_F_NEXT:
            # Only a chain's sole descriptor may refer to an indirect table (Linux's layout).
            raise self._chain_error(head, "an indirect descriptor must be the only descriptor of its chain")
        if length == 0 or length % DESCRIPTOR_SIZE:
            raise self._chain_error(head, f"indirect table length {length} is not a multiple of {DESCRIPTOR_SIZE}")
        if length // DESCRIPTOR_SIZE > self.size:
            raise self._chain_error(head, f"indirect table of {length // DESCRIPTOR_SIZE} descriptors is longer "
                                          f"than the queue ({self.size})")
        try:
            return self.memory.read(address, length)
        except GuestMemoryError:
            raise self._chain_error(head, f"indirect table {address:#x}+{length:#x} is not in guest RAM") from None

    # -- the device's side: used buffers ----------------------------------------

    def push(self, chain: DescriptorChain | int, written: int) -> None:
        """Give a chain back to the driver, saying how many bytes the device wrote into it."""
        head = chain.head if isinstance(chain, DescriptorChain) else chain
        used = self._used
        # The element first, then the index that publishes it (x86 keeps stores in order).
        _USED_ELEMENT.pack_into(used, 4 + 8 * (self.used_idx % self.size), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(used, 2, self.used_idx)

    def should_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the buffers used since the last call."""
        old, new = self._used_idx_at_last_check, self.used_idx
        self._used_idx_at_last_check = new
        if old == new:
            return False
        if self.event_idx:
            full_barrier()  # our used index must be visible before we read used_event
            (used_event,) = _U16.unpack_from(self._avail, 4 + 2 * self.size)
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not _U16.unpack_from(self._avail, 0)[0] & AVAIL_F_NO_INTERRUPT
