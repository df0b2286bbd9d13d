"""virtio-blk's compiled request path, and whether it is used.

A request on the software CPU costs the guest a QueueNotify write, the
device's work and an interrupt; in Python the device's part (walking the
chain, unpacking the header, making views for preadv, the status byte, the
used ring) was most of the VMM's time per 4 KiB read. So, where `make
install` or `pip install` could compile blk_requests.c (it needs a C
compiler and Python's headers), `VirtioBlock.queue_notify` on a raw disk
first hands the whole queue to `blk_drain`: one call that walks each
available chain, carries out IN, OUT and FLUSH with preadv/pwritev/fdatasync
straight into and out of guest RAM, writes the status byte and fills the used
ring. It stops at the first chain it cannot carry out successfully, leaving
it available: Python then takes that chain as it always did (queue.pop() and
VirtioBlock._handle give a malformed chain, an out-of-range request, GET_ID,
discard or a host I/O error the same outcome as without the module) and
hands the rest of the queue back. The interrupt decision stays in Python
(`used_buffers`, once per notification, as before).

qcow2 disks, and every disk where the module was not built, go through
Python alone. PYVMM_BLK_REQUESTS=python chooses that even where the module
was built (the tests run both, and a differential test holds them to the same
guest memory, used ring and file).
"""

from __future__ import annotations

import os

from devices.virtio.blk_requests_build import source_digest
from devices.virtio.queue import Virtqueue
from vmm.compiled_module import built_from_sources
from vmm.memory import GuestMemory, NativeWriteListener

REQUESTS_ENV = "PYVMM_BLK_REQUESTS"  # "python": carry every request out in Python

try:
    from devices.virtio._blk_requests import ffi, lib
except ImportError:  # not built: no compiler at install time, or never installed
    ffi = lib = None

# The written ranges one call may report before it returns to have them reported: a chain's
# writable buffers and its status byte always fit (a queue has at most 256 entries).
WRITTEN_CAPACITY = 1024


def compiled_requests_built() -> bool:
    """True when the module was built from the blk_requests.c beside this file (one built
    from another version could disagree with the Python side here)."""
    return built_from_sources(lib, "BLK_REQUESTS_DIGEST", source_digest())


def use_compiled_requests() -> bool:
    return os.environ.get(REQUESTS_ENV) != "python" and compiled_requests_built()


class CompiledRequests:
    """One raw disk's compiled request path, from DRIVER_OK until the device is reset or closed."""

    def __init__(self, memory: GuestMemory, fd: int, *, readonly: bool, capacity: int, max_transfer: int) -> None:
        self._memory = memory
        # Held (and so kept mapped) until close(): blk_drain writes through these addresses.
        self._mappings = [ffi.from_buffer("uint8_t[]", region.mapping) for region in memory.regions]
        self._regions = ffi.new("struct blk_region[]", [
            (region.guest_address, region.size, mapping + region.start)
            for region, mapping in zip(memory.regions, self._mappings, strict=True)])
        self._device = ffi.new("struct blk_device *", (self._regions, len(self._mappings), fd, readonly,
                                                        capacity, max_transfer))
        self._queue = ffi.new("struct blk_queue *")
        self._pairs = ffi.new("uint64_t[]", 2 * WRITTEN_CAPACITY)
        self._written = ffi.new("struct blk_written *", (self._pairs, WRITTEN_CAPACITY, 0))
        self._completed = ffi.new("uint32_t *")
        # The same report, made straight to the listener's C function (_tell_listener).
        self._native: tuple[NativeWriteListener, object, object] | None = None

    def drain(self, queue: Virtqueue) -> tuple[bool, int]:
        """Carry out the available requests up to the first one for Python: (whether the queue
        is empty now, how many requests were carried out)."""
        q = self._queue
        q.desc, q.avail, q.used = queue.desc_address, queue.driver_address, queue.device_address
        q.size, q.last_avail, q.used_idx = queue.size, queue.last_avail, queue.used_idx
        q.event_idx, q.indirect = queue.event_idx, queue.indirect
        # The software CPU drops code translated from what devices wrote; on KVM nobody listens.
        listening = self._memory.device_write_listener is not None
        written = (self._tell_listener() or self._written) if listening else ffi.NULL
        completed = 0
        while True:
            status = lib.blk_drain(self._device, q, written, self._completed)
            # (Before anything that could raise: the used ring already holds what was carried out.)
            queue.last_avail, queue.used_idx = q.last_avail, q.used_idx
            completed += self._completed[0]
            if listening and self._written.count:
                pairs = ffi.unpack(self._pairs, 2 * self._written.count)
                self._written.count = 0
                self._memory.devices_wrote(list(zip(pairs[0::2], pairs[1::2], strict=True)))
            if status != lib.BLK_FULL:
                break
        return status == lib.BLK_DRAINED, completed

    def _tell_listener(self):
        """A report that goes to the listener's C function, if it may be called now (else None)."""
        ask = self._memory.native_write_listener
        listener = ask() if ask is not None else None
        if listener is None:
            return None
        if self._native is None or self._native[0] is not listener:
            starts = ffi.new("uint64_t[]", listener.region_starts)
            report = ffi.new("struct blk_written *", (self._pairs, WRITTEN_CAPACITY, 0,
                                                      ffi.cast("void (*)(void *, uint64_t, uint64_t)", listener.function),
                                                      ffi.cast("void *", listener.context), starts))
            self._native = (listener, report, starts)
        return self._native[1]

    def close(self) -> None:
        for mapping in self._mappings:
            ffi.release(mapping)
        self._mappings = []
