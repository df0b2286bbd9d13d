"""virtio-fs (virtio 1.x, 5.11): a host directory tree the guest mounts with `mount -t virtiofs TAG DIR`.

Configuration space: `tag` (36 bytes, UTF-8, NUL-padded when shorter) and
`num_request_queues` (u32). Queue 0 is the high-priority queue (FORGET and
BATCH_FORGET), then the request queues; pyvmm has one. Every chain on either
is one FUSE request: the device-readable part holds fuse_in_header and the
operation's arguments (and a WRITE's data), the device-writable part takes
fuse_out_header and the reply. The FUSE server (vmm/fuse/server.py) does the
work; this device moves the bytes. A request the server answers later (a
read of input that has not arrived) keeps its chain until then; other
requests, on any queue, are answered meanwhile (the guest matches replies to
requests by their unique ID).

The data of READ and WRITE never passes through a Python bytes object: a
WRITE's data goes from guest pages to the host file with pwritev, a READ's
from the host file into guest pages with preadv, the way virtio-blk does it.
A chain with no room for a reply header gets nothing written (and is logged).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from devices.log_once import LogOnce
from devices.virtio import constants as c
from devices.virtio.device import VirtioDevice
from devices.virtio.queue import DescriptorChain
from vmm.fuse import protocol as p
from vmm.fuse.request import Deferred, Reply, Request
from vmm.fuse.session import FuseSession
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)

REQUEST_QUEUES = 1
QUEUE_SIZE = 128
TAG_BYTES = c.FS_TAG_BYTES


class ChainRequest(Request):
    """The device-readable bytes of a descriptor chain, as the FUSE server reads a request."""

    def __init__(self, chain: DescriptorChain, memory: GuestMemory) -> None:
        self.chain = chain
        self.memory = memory
        self.length = chain.readable_length

    def read(self, offset: int, length: int) -> bytes:
        return self.chain.read(self.memory, offset, length)

    @contextmanager
    def views(self, offset: int, length: int) -> Iterator[list[memoryview]]:
        with self.memory.views(self.chain.readable_ranges(offset, length)) as buffers:
            yield buffers


class VirtioFs(VirtioDevice):
    device_id = c.DEVICE_FS
    name = "virtio-fs"
    queue_max_sizes = (QUEUE_SIZE,) * (1 + REQUEST_QUEUES)

    def __init__(self, server: FuseSession, tag: str) -> None:
        encoded = tag.encode()
        if not encoded or len(encoded) > TAG_BYTES:
            raise ValueError(f"virtio-fs tag {tag!r} must be 1 to {TAG_BYTES} bytes")
        self.server = server
        self.tag = encoded
        self._odd = LogOnce(log, f"virtio-fs {tag}")
        self._generation = 0  # bumped by a reset: replies that come later are then dropped

    @property
    def requests(self) -> int:
        return self.server.requests

    @property
    def errors(self) -> int:
        return self.server.errors

    def config(self) -> bytes:
        return self.tag.ljust(TAG_BYTES, b"\0") + struct.pack("<I", REQUEST_QUEUES)

    def queue_notify(self, index: int) -> None:
        queue = self.queue(index)
        while (chain := queue.pop()) is not None:
            reply = self.server.handle(ChainRequest(chain, self.memory))
            if isinstance(reply, Deferred):
                reply.then(lambda answer, chain=chain, generation=self._generation: self.run_locked(
                    self._answer_later, queue, chain, answer, generation))
                continue
            queue.push(chain, 0 if reply is None else self._send(chain, reply))
        self.used_buffers(queue)

    def _answer_later(self, queue, chain: DescriptorChain, reply: Reply, generation: int) -> None:
        if generation != self._generation:
            return  # the driver reset the device meanwhile: the chain is no longer ours
        queue.push(chain, self._send(chain, reply))
        self.used_buffers(queue)

    def reset(self) -> None:
        self._generation += 1

    def _send(self, chain: DescriptorChain, reply: Reply) -> int:
        """Write the reply into the chain's writable buffers; returns the bytes written."""
        room = chain.writable_length
        head_length = p.OUT_HEADER.size + len(reply.body)
        if room < p.OUT_HEADER.size:
            self._odd("room", "request without room for a reply header")
            return 0
        if head_length > room:
            self._odd("reply-size", "a reply of %d bytes does not fit the guest's %d", head_length, room)
            return chain.write(self.memory, Reply(reply.unique, errno.ERANGE).header())
        data_length = 0
        wanted = reply.file_data
        if wanted is not None:
            ranges = chain.writable_ranges(head_length, min(wanted.length, room - head_length))
            try:
                with self.memory.views(ranges) as buffers:
                    data_length = os.preadv(wanted.fd, buffers, wanted.offset) if buffers else 0
            except OSError as err:
                return chain.write(self.memory, Reply(reply.unique, err.errno or errno.EIO).header())
            finally:
                self.memory.devices_wrote(ranges)  # the software CPU drops code translated from them
        return chain.write(self.memory, reply.header(data_length) + reply.body) + data_length

    def close(self) -> None:
        self.server.close()
