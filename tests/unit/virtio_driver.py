"""A fake virtio-mmio driver for unit tests, doing what Linux's virtio_mmio/virtio_ring do.

It talks to a transport only through `read`/`write` of its register page,
lays out split virtqueues in a real `GuestMemory`, and lets tests build
chains by hand (including malformed ones) to see what the device does.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from devices.virtio import constants as c
from devices.virtio import mmio as r
from devices.virtio.blk import VirtioBlock
from devices.virtio.blk_requests import REQUESTS_ENV, compiled_requests_built
from devices.virtio.mmio import VirtioMmioTransport
from devices.virtio.net_backends import NetBackend
from devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from vmm.bus import NullIrqLine
from vmm.memory import GuestMemory

MEMORY_SIZE = 16 << 20
HEAP_START = 0x10_0000


class Heap:
    """A bump allocator for driver structures and buffers in guest RAM."""

    def __init__(self, memory: GuestMemory, start: int = HEAP_START) -> None:
        self.memory = memory
        self.next = start

    def alloc(self, size: int, align: int = 16, data: bytes | None = None) -> int:
        address = (self.next + align - 1) & -align
        self.next = address + max(size, 1)
        assert self.next <= self.memory.size, "fake guest heap exhausted"
        self.memory.write(address, data if data is not None else bytes(size))
        return address


@dataclass
class Buffer:
    address: int
    length: int
    writable: bool = False


class FakeQueue:
    def __init__(self, driver: FakeDriver, index: int, size: int) -> None:
        self.driver = driver
        self.memory = driver.memory
        self.index = index
        self.size = size
        heap = driver.heap
        self.desc = heap.alloc(16 * size, 16)
        self.avail = heap.alloc(6 + 2 * size, 2)
        self.used = heap.alloc(6 + 8 * size, 4)
        self.avail_idx = 0
        self.last_used = 0
        self.next_free = 0  # descriptors are handed out round-robin; tests keep few in flight

    # -- building chains ---------------------------------------------------------

    def write_descriptor(self, index: int, address: int, length: int, flags: int, following: int = 0,
                         table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, struct.pack("<QIHH", address, length, flags, following))

    def add(self, buffers: list[Buffer], *, indirect: bool = False, kick: bool = True) -> int:
        """Put a chain on the available ring; returns its head."""
        head = self.next_free % self.size
        if indirect:
            table = self.driver.heap.alloc(16 * len(buffers), 16)
            for i, buf in enumerate(buffers):
                flags = (DESC_F_WRITE if buf.writable else 0) | (DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.write_descriptor(i, buf.address, buf.length, flags, i + 1, table=table)
            self.write_descriptor(head, table, 16 * len(buffers), DESC_F_INDIRECT)
            self.next_free += 1
        else:
            for i, buf in enumerate(buffers):
                index = (head + i) % self.size
                flags = (DESC_F_WRITE if buf.writable else 0) | (DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.write_descriptor(index, buf.address, buf.length, flags, (index + 1) % self.size)
            self.next_free += len(buffers)
        self.publish(head, kick=kick)
        return head

    def publish(self, head: int, *, kick: bool = True) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)
        if kick:
            self.kick()

    def kick(self) -> None:
        self.driver.write(r.QUEUE_NOTIFY, self.index)

    # -- reading results -----------------------------------------------------------

    def take_used(self) -> list[tuple[int, int]]:
        used_idx = self.memory.read_u16(self.used + 2)
        out = []
        while self.last_used != used_idx:
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)


class FakeDriver:
    def __init__(self, transport: VirtioMmioTransport, memory: GuestMemory, irq: NullIrqLine | None = None) -> None:
        self.transport = transport
        self.memory = memory
        self.irq = irq
        self.heap = Heap(memory)
        self.queues: list[FakeQueue] = []

    def read(self, offset: int) -> int:
        return self.transport.read(offset, 4)

    def write(self, offset: int, value: int) -> None:
        self.transport.write(offset, 4, value)

    def device_features(self) -> int:
        self.write(r.DEVICE_FEATURES_SEL, 0)
        low = self.read(r.DEVICE_FEATURES)
        self.write(r.DEVICE_FEATURES_SEL, 1)
        return low | self.read(r.DEVICE_FEATURES) << 32

    def negotiate(self, accept: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; True if the device kept FEATURES_OK."""
        assert self.read(r.MAGIC_VALUE) == r.MAGIC and self.read(r.VERSION_REG) == 2
        self.write(r.STATUS, 0)
        self.write(r.STATUS, c.STATUS_ACKNOWLEDGE)
        self.write(r.STATUS, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
        offered = self.device_features()
        features = offered if accept is None else accept
        for sel in (0, 1):
            self.write(r.DRIVER_FEATURES_SEL, sel)
            self.write(r.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.write(r.STATUS, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK)
        self.features = features
        return bool(self.read(r.STATUS) & c.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> FakeQueue:
        self.write(r.QUEUE_SEL, index)
        assert self.read(r.QUEUE_READY) == 0
        maximum = self.read(r.QUEUE_NUM_MAX)
        assert maximum > 0
        queue = FakeQueue(self, index, size or min(maximum, 64))
        self.write(r.QUEUE_NUM, queue.size)
        for low, address in ((r.QUEUE_DESC_LOW, queue.desc), (r.QUEUE_DRIVER_LOW, queue.avail),
                             (r.QUEUE_DEVICE_LOW, queue.used)):
            self.write(low, address & 0xFFFF_FFFF)
            self.write(low + 4, address >> 32)
        self.write(r.QUEUE_READY, 1)
        self.queues.append(queue)
        return queue

    def start(self, queue_count: int, accept: int | None = None, size: int | None = None) -> list[FakeQueue]:
        """The whole handshake, as Linux does it."""
        assert self.negotiate(accept)
        queues = [self.setup_queue(i, size) for i in range(queue_count)]
        self.write(r.STATUS, self.read(r.STATUS) | c.STATUS_DRIVER_OK)
        return queues

    def ack_interrupt(self) -> int:
        status = self.read(r.INTERRUPT_STATUS)
        self.write(r.INTERRUPT_ACK, status)
        return status

    @property
    def status(self) -> int:
        return self.read(r.STATUS)

    def config(self, offset: int, size: int) -> int:
        return self.transport.read(r.CONFIG + offset, size)


def make_transport(device, memory_size: int = MEMORY_SIZE):
    memory = GuestMemory(memory_size)
    irq = NullIrqLine()
    transport = VirtioMmioTransport(device, memory, irq)
    return transport, FakeDriver(transport, memory, irq), memory, irq


class BlkDriver:
    """Issues virtio-blk requests the way Linux's virtio_blk lays them out."""

    def __init__(self, device: VirtioBlock, indirect: bool = False, accept: int | None = None) -> None:
        self.device = device
        self.transport, self.driver, self.memory, self.irq = make_transport(device)
        (self.queue,) = self.driver.start(1, accept=accept)
        self.indirect = indirect

    def request(self, kind: int, sector: int = 0, out: bytes = b"", in_length: int = 0) -> tuple[int, bytes, int]:
        """Returns (status, data read, used length)."""
        heap = self.driver.heap
        header = heap.alloc(16, data=struct.pack("<IIQ", kind, 0, sector))
        buffers = [Buffer(header, 16)]
        if out:
            buffers.append(Buffer(heap.alloc(len(out), data=out), len(out)))
        data = heap.alloc(in_length) if in_length else None
        if in_length:
            buffers.append(Buffer(data, in_length, writable=True))
        status = heap.alloc(1, data=b"\xff")
        buffers.append(Buffer(status, 1, writable=True))
        head = self.queue.add(buffers, indirect=self.indirect)
        used = self.queue.take_used()
        assert used and used[-1][0] == head
        read = self.memory.read(data, in_length) if in_length else b""
        self.driver.heap.next = 0x20_0000  # requests are synchronous: reuse the buffer space
        return self.memory.read_u8(status), read, used[-1][1]

    def config(self, offset: int, size: int) -> int:
        return self.driver.config(offset, size)


class FakeBackend(NetBackend):
    def __init__(self, offloads: int = 0) -> None:
        self.offload_features = offloads
        self.incoming: list[bytes] = []
        self.sent: list[bytes] = []
        self.paused = True
        self.offloads = None
        self.ready = None

    def start(self, loop, ready):
        self.ready = ready

    def receive(self):
        return self.incoming.pop(0) if self.incoming else None

    def send(self, packet):
        self.sent.append(packet)

    def pause_receive(self):
        self.paused = True

    def resume_receive(self):
        self.paused = False

    def set_offloads(self, guest_features):
        self.offloads = guest_features

    def close(self):
        pass


@contextmanager
def blk_requests(path: str) -> Iterator[None]:
    """Within the block, virtio-blk devices activated carry raw disks' requests out through
    `path`: "compiled" (devices/virtio/blk_requests.c; the test is skipped where it was not
    built) or "python"."""
    if path == "compiled" and not compiled_requests_built():
        pytest.skip("virtio-blk's compiled request path is not built (make install, or "
                    "python -m devices.virtio.blk_requests_build, with gcc and python3-dev)")
    previous = os.environ.pop(REQUESTS_ENV, None)
    if path == "python":
        os.environ[REQUESTS_ENV] = "python"
    try:
        yield
    finally:
        os.environ.pop(REQUESTS_ENV, None)
        if previous is not None:
            os.environ[REQUESTS_ENV] = previous
