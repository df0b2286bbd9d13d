"""virtio-fs through the transport and a fake driver: FUSE requests in descriptor chains."""

from __future__ import annotations

import os
import struct

import pytest

from devices.virtio import constants as c
from devices.virtio.fs import VirtioFs
from tests.unit.virtio_driver import Buffer, make_transport
from vmm.fuse import protocol as p
from vmm.fuse.server import FuseServer


class FsDriver:
    """What Linux's virtio_fs does: header and arguments readable, reply writable."""

    def __init__(self, root, readonly=False) -> None:
        self.device = VirtioFs(FuseServer(str(root), readonly=readonly), "share")
        _, self.driver, self.memory, _ = make_transport(self.device)
        self.hiprio, self.requests = self.driver.start(2)
        self.unique = 0

    def request(self, opcode: int, nodeid: int, *pieces: bytes, reply_room: tuple[int, ...] = (4096,),
                queue=None) -> tuple[int, bytes]:
        """Send a request whose readable part is `pieces` (header first, added here); (used length, reply)."""
        self.unique += 1
        body = b"".join(pieces)
        header = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0)
        heap = self.driver.heap
        chunks = [header + pieces[0] if pieces else header, *pieces[1:]]
        buffers = [Buffer(heap.alloc(len(chunk), data=chunk), len(chunk)) for chunk in chunks]
        replies = [Buffer(heap.alloc(size), size, True) for size in reply_room if size]
        queue = queue or self.requests
        head = queue.add(buffers + replies)
        ((used_head, length),) = queue.take_used()
        assert used_head == head
        reply = b"".join(self.memory.read(b.address, b.length) for b in replies)
        return length, reply[:length]

    def ok(self, opcode: int, nodeid: int, *pieces: bytes, **kwargs) -> bytes:
        length, reply = self.request(opcode, nodeid, *pieces, **kwargs)
        size, error, unique = p.OUT_HEADER.unpack_from(reply)
        assert (size, error, unique) == (length, 0, self.unique)
        return reply[p.OUT_HEADER.size :]


@pytest.fixture
def fs(tmp_path):
    (tmp_path / "file").write_bytes(bytes(range(256)) * 64)
    driver = FsDriver(tmp_path)
    driver.ok(p.INIT, 0, p.INIT_IN.pack(7, 37, 65536, 0) + bytes(48))
    yield driver
    driver.device.close()


def test_config_holds_the_tag_and_one_request_queue(fs):
    assert fs.driver.read(0x008) == c.DEVICE_FS
    config = b"".join(fs.driver.config(offset, 4).to_bytes(4, "little") for offset in range(0, 40, 4))
    assert config[:36] == b"share".ljust(36, b"\0")
    assert struct.unpack_from("<I", config, 36)[0] == 1


def test_a_read_lands_in_scattered_reply_buffers(fs):
    nodeid = p.ENTRY_OUT.unpack(fs.ok(p.LOOKUP, p.ROOT_ID, b"file\0"))[0]
    fh = p.OPEN_OUT.unpack(fs.ok(p.OPEN, nodeid, p.OPEN_IN.pack(os.O_RDONLY, 0)))[0]
    data = fs.ok(p.READ, nodeid, p.READ_IN.pack(fh, 100, 10000, 0, 0, 0, 0), reply_room=(16, 4000, 8000))
    assert data == (bytes(range(256)) * 64)[100:10100]


def test_a_read_is_cut_to_the_reply_room(fs):
    nodeid = p.ENTRY_OUT.unpack(fs.ok(p.LOOKUP, p.ROOT_ID, b"file\0"))[0]
    fh = p.OPEN_OUT.unpack(fs.ok(p.OPEN, nodeid, p.OPEN_IN.pack(os.O_RDONLY, 0)))[0]
    data = fs.ok(p.READ, nodeid, p.READ_IN.pack(fh, 0, 10000, 0, 0, 0, 0), reply_room=(116,))
    assert data == bytes(range(100))


def test_write_data_spread_over_readable_buffers(fs, tmp_path):
    body = fs.ok(p.CREATE, p.ROOT_ID, p.CREATE_IN.pack(os.O_WRONLY, 0o100644, 0, 0) + b"new\0")
    nodeid, fh = p.ENTRY_OUT.unpack_from(body)[0], p.OPEN_OUT.unpack_from(body, p.ENTRY_OUT.size)[0]
    data = os.urandom(9000)
    reply = fs.ok(p.WRITE, nodeid, p.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0), data[:4096], data[4096:])
    assert p.WRITE_OUT.unpack(reply)[0] == 9000
    assert (tmp_path / "new").read_bytes() == data


def test_forget_on_the_hiprio_queue_uses_nothing(fs):
    fs.ok(p.LOOKUP, p.ROOT_ID, b"file\0")
    assert fs.request(p.FORGET, 2, p.FORGET_IN.pack(1), reply_room=(), queue=fs.hiprio) == (0, b"")
    length, reply = fs.request(p.GETATTR, 2, p.GETATTR_IN.pack(0, 0, 0))
    assert p.OUT_HEADER.unpack_from(reply)[1] == -116  # ESTALE


def test_requests_without_reply_room_or_header_break_nothing(fs):
    assert fs.request(p.GETATTR, p.ROOT_ID, p.GETATTR_IN.pack(0, 0, 0), reply_room=(8,))[0] == 0
    assert fs.request(p.STATFS, p.ROOT_ID, reply_room=(40,))[0] == p.OUT_HEADER.size  # ERANGE, header only
    assert not fs.driver.status & c.STATUS_NEEDS_RESET
    assert fs.ok(p.STATFS, p.ROOT_ID)
