"""virtio-blk (virtio 1.x, 5.2): a disk image as a block device, one request queue.

A request is a chain: a 16-byte header {type u32, ioprio u32, sector u64}
and any data in the device-readable part; any data and a final status byte
in the device-writable part (VERSION_1 implies "any layout", so the header,
data and status may be split across descriptors in any way).

    IN            read from sector into the writable data
    OUT           write the readable data at sector (IOERR on a read-only disk)
    FLUSH         the image's flush(): fdatasync for raw, metadata too for qcow2
    GET_ID        the serial, 20 bytes, NUL-padded
    DISCARD       {sector u64, sectors u32, flags u32} segments: deallocate
    WRITE_ZEROES  the same segments: read back as zeros afterwards

A request the device cannot carry out (out of range, a host I/O error, a
malformed header) fails with an error status in its own status byte; only a
chain with no room for a status byte breaks the queue (NEEDS_RESET).

On a raw disk, where blk_requests.c was built, the reads, writes and flushes
that succeed are carried out in C, a whole queue in one call; every other
request, and every request where it was not built, goes through the code
here (blk_requests.py).
"""

from __future__ import annotations

import logging
import struct

from devices.log_once import LogOnce
from devices.virtio import constants as c
from devices.virtio.blk_requests import CompiledRequests, use_compiled_requests
from devices.virtio.device import Activation, VirtioDevice
from devices.virtio.queue import DescriptorChain, VirtqueueError
from vmm.errors import PyvmmError
from vmm.image.base import BlockDevice
from vmm.image.raw import RawImage

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
QUEUE_SIZE = 256
# Longest data transfer one request may ask for. Linux sends at most
# max_sectors_kb (1280 KiB by default); this only bounds what a hostile
# guest can make the VMM allocate.
MAX_TRANSFER = 32 << 20
ID_BYTES = c.BLK_ID_BYTES

# Feature bits (5.2.3).
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_DISCARD = 13
F_WRITE_ZEROES = 14

# Request types and status values (5.2.6).
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

HEADER = struct.Struct("<IIQ")
_STATUS_BYTES = {status: bytes((status,)) for status in (S_OK, S_IOERR, S_UNSUPP)}
SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes
WRITE_ZEROES_FLAG_UNMAP = 1

MAX_SEGMENT_SECTORS = 0x3F_FFFF  # per discard / write-zeroes segment (2 GiB - 512)
MAX_SEGMENTS = 1
SIZE_MAX = 1 << 20  # largest single data buffer we ask the driver to use


class VirtioBlock(VirtioDevice):
    device_id = c.DEVICE_BLOCK
    name = "virtio-blk"
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, image: BlockDevice, *, serial: str = "", readonly: bool | None = None,
                 compiled_requests: bool = True) -> None:
        self.image = image
        self.readonly = image.readonly if readonly is None else (readonly or image.readonly)
        self.serial = serial.encode()[:ID_BYTES]
        self.capacity = image.size // SECTOR_SIZE
        self._odd = LogOnce(log, f"virtio-blk {image.filename}")
        self.requests = 0
        self.errors = 0
        # A raw disk's requests in C where that was built (blk_requests.py), from DRIVER_OK on,
        # if the machine asks for it (vmm/builder.py says when it does not).
        self.compiled_requests = compiled_requests
        self._compiled: CompiledRequests | None = None

    def features(self) -> int:
        bits = (1 << F_SIZE_MAX) | (1 << F_SEG_MAX) | (1 << F_BLK_SIZE) | (1 << F_FLUSH)
        if self.readonly:
            bits |= 1 << F_RO
        else:
            bits |= (1 << F_DISCARD) | (1 << F_WRITE_ZEROES)
        return bits

    def config(self) -> bytes:
        # struct virtio_blk_config up to write_zeroes_may_unmap and its padding.
        return struct.pack(
            "<QII HBB I BBHI BBH III IIB3x",
            self.capacity, SIZE_MAX, QUEUE_SIZE - 2,
            0, 0, 0,                            # geometry: not used by virtio 1.x drivers
            SECTOR_SIZE,                        # blk_size
            0, 0, 0, 0,                         # topology
            0, 0, 1,                            # writeback (no CONFIG_WCE), unused, num_queues
            MAX_SEGMENT_SECTORS, MAX_SEGMENTS, 1,   # discard
            MAX_SEGMENT_SECTORS, MAX_SEGMENTS, 1,   # write zeroes, which may unmap
        )

    def activate(self, activation: Activation) -> None:
        super().activate(activation)
        self._stop_compiled()
        if self.compiled_requests and isinstance(self.image, RawImage) and use_compiled_requests():
            self._compiled = CompiledRequests(activation.memory, self.image.fileno(), readonly=self.readonly,
                                              capacity=self.capacity, max_transfer=MAX_TRANSFER)

    def queue_notify(self, index: int) -> None:
        queue = self.queue(index)
        compiled = self._compiled
        while True:
            if compiled is not None:
                # Everything up to the first request it leaves to Python (blk_requests.py).
                drained, completed = compiled.drain(queue)
                self.requests += completed
                if drained:
                    break
            chain = queue.pop()
            if chain is None:
                break
            written = self._handle(chain)
            queue.push(chain, written)
        self.used_buffers(queue)

    # -- one request -------------------------------------------------------------

    def _handle(self, chain: DescriptorChain) -> int:
        """Carry out one request; returns the bytes written into its writable buffers."""
        status_address = chain.last_writable_byte()
        if status_address is None:
            raise VirtqueueError(f"virtio-blk request {chain.head} has no room for a status byte")
        self.requests += 1
        status, written, data_ranges = self._execute(chain, chain.writable_length - 1)
        if status != S_OK:
            self.errors += 1
        memory = self.memory
        memory.write(status_address, _STATUS_BYTES[status])
        # One report for the data and the status byte: the software CPU drops code translated from them.
        memory.devices_wrote([*data_ranges, (status_address, 1)])
        return written + 1

    def _execute(self, chain: DescriptorChain, data_room: int) -> tuple[int, int, list[tuple[int, int]]]:
        """The request's status, the bytes of data it wrote and where it wrote them (still to be
        reported to the accelerator)."""
        if chain.readable_length < HEADER.size:
            self._odd("header", "request without a full header")
            return S_IOERR, 0, []
        kind, _ioprio, sector = HEADER.unpack(chain.read(self.memory, 0, HEADER.size))
        payload = chain.readable_length - HEADER.size
        try:
            if kind == T_IN:
                return self._read(chain, sector, data_room)
            if kind == T_OUT:
                return self._write(chain, sector, payload), 0, []
            if kind == T_FLUSH:
                if not self.readonly:
                    self.image.flush()
                return S_OK, 0, []
            if kind == T_GET_ID:
                ident = self.serial.ljust(ID_BYTES, b"\0")[: min(ID_BYTES, data_room)]
                return S_OK, chain.write(self.memory, ident), []  # (write() reported it)
            if kind in (T_DISCARD, T_WRITE_ZEROES):
                return self._segments(chain, kind, payload), 0, []
        except (OSError, PyvmmError) as err:
            # A host I/O error, an out-of-range access the image refused, a corrupt qcow2.
            self._odd(f"io-{type(err).__name__}", "request type %d at sector %d failed: %s", kind, sector, err)
            return S_IOERR, 0, []
        self._odd(f"type-{kind}", "unsupported request type %d", kind)
        return S_UNSUPP, 0, []

    def _range(self, sector: int, length: int) -> int | None:
        """The byte offset of a transfer, or None when it does not fit the disk."""
        if length % SECTOR_SIZE or length > MAX_TRANSFER:
            self._odd("length", "transfer of %d bytes (not whole sectors, or too long)", length)
            return None
        if sector > self.capacity or length // SECTOR_SIZE > self.capacity - sector:
            self._odd("range", "transfer at sector %d of %d bytes is beyond the disk", sector, length)
            return None
        return sector * SECTOR_SIZE

    def _read(self, chain: DescriptorChain, sector: int, length: int) -> tuple[int, int, list[tuple[int, int]]]:
        offset = self._range(sector, length)
        if offset is None:
            return S_IOERR, 0, []
        # Straight into the guest's buffers (one preadv for a raw image).
        ranges = chain.writable_ranges(0, length)
        try:
            with self.memory.views(ranges) as buffers:
                self.image.read_into(offset, buffers)
        except BaseException:
            self.memory.devices_wrote(ranges)  # whatever it wrote before it failed
            raise
        return S_OK, length, ranges

    def _write(self, chain: DescriptorChain, sector: int, length: int) -> int:
        if self.readonly:
            self._odd("readonly", "write to a read-only disk refused")
            return S_IOERR
        offset = self._range(sector, length)
        if offset is None:
            return S_IOERR
        with self.memory.views(chain.readable_ranges(HEADER.size, length)) as buffers:
            self.image.write_from(offset, buffers)
        return S_OK

    def _segments(self, chain: DescriptorChain, kind: int, length: int) -> int:
        if self.readonly:
            self._odd("readonly", "write to a read-only disk refused")
            return S_IOERR
        if length == 0 or length % SEGMENT.size or length // SEGMENT.size > MAX_SEGMENTS:
            self._odd("segments", "discard/write-zeroes with %d bytes of segments", length)
            return S_UNSUPP
        data = chain.read(self.memory, HEADER.size, length)
        ranges = []
        for sector, count, flags in SEGMENT.iter_unpack(data):
            if count > MAX_SEGMENT_SECTORS:
                self._odd("segment-size", "discard/write-zeroes segment of %d sectors", count)
                return S_IOERR
            known = WRITE_ZEROES_FLAG_UNMAP if kind == T_WRITE_ZEROES else 0
            if flags & ~known:
                return S_UNSUPP  # the specification's answer to unknown flags
            offset = self._segment_range(sector, count)
            if offset is None:
                return S_IOERR
            ranges.append((offset, count * SECTOR_SIZE))
        for offset, size in ranges:
            if kind == T_DISCARD:
                self.image.discard(offset, size)
            else:
                self.image.write_zeroes(offset, size)
        return S_OK

    def _segment_range(self, sector: int, count: int) -> int | None:
        # Discard and write-zeroes move no data through the VMM, so they may
        # be longer than MAX_TRANSFER; only the disk's end bounds them.
        if sector > self.capacity or count > self.capacity - sector:
            self._odd("range", "discard/write-zeroes at sector %d (%d sectors) is beyond the disk", sector, count)
            return None
        return sector * SECTOR_SIZE

    def _stop_compiled(self) -> None:
        if self._compiled is not None:
            self._compiled.close()
            self._compiled = None

    def close(self) -> None:
        self._stop_compiled()  # before the file closes: its number could be reused
        self.image.close()
