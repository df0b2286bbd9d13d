"""A FUSE client for unit tests: builds requests as the kernel does and parses replies."""

from __future__ import annotations

import errno
import itertools

from vmm.fuse import protocol as p
from vmm.fuse.request import BytesRequest
from vmm.fuse.server import FuseServer


class FuseClient:
    def __init__(self, server: FuseServer) -> None:
        self.server = server
        self._unique = itertools.count(2, 2)

    def raw(self, data: bytes) -> tuple[int, bytes] | None:
        """Send request bytes as they are; (errno, body) of the reply, or None when there is none."""
        reply = self.server.handle(BytesRequest(data))
        if reply is None:
            return None
        encoded = reply.to_bytes()
        length, error, _unique = p.OUT_HEADER.unpack_from(encoded)
        assert length == len(encoded)
        return -error, encoded[p.OUT_HEADER.size :]

    def request(self, opcode: int, nodeid: int = p.ROOT_ID, *args: bytes) -> tuple[int, bytes] | None:
        body = b"".join(args)
        header = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, next(self._unique), nodeid,
                                  0, 0, 1, 0, 0)
        return self.raw(header + body)

    def ok(self, opcode: int, nodeid: int = p.ROOT_ID, *args: bytes) -> bytes:
        code, body = self.request(opcode, nodeid, *args)
        assert code == 0, f"opcode {opcode} failed: {errno.errorcode.get(code, code)}"
        return body

    def error(self, opcode: int, nodeid: int = p.ROOT_ID, *args: bytes) -> int:
        code, _ = self.request(opcode, nodeid, *args)
        return code

    # -- operations ----------------------------------------------------------------

    def init(self) -> tuple:
        body = self.ok(p.INIT, 0, p.INIT_IN.pack(7, 37, 1 << 20, 0xFFFF_FFFF) + bytes(48))
        return p.INIT_OUT.unpack(body)

    def lookup(self, name: bytes, parent: int = p.ROOT_ID) -> tuple[int, tuple]:
        """(nodeid, attr fields) of `name`; nodeid 0 for a negative entry."""
        values = p.ENTRY_OUT.unpack(self.ok(p.LOOKUP, parent, name + b"\0"))
        return values[0], values[6:]

    def getattr(self, nodeid: int) -> tuple:
        return p.ATTR_OUT.unpack(self.ok(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0)))[3:]

    def open(self, nodeid: int, flags: int) -> int:
        return p.OPEN_OUT.unpack(self.ok(p.OPEN, nodeid, p.OPEN_IN.pack(flags, 0)))[0]

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self.ok(p.READ, nodeid, p.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        body = self.ok(p.WRITE, nodeid, p.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0), data)
        return p.WRITE_OUT.unpack(body)[0]

    def create(self, name: bytes, mode: int = 0o644, flags: int = 0o2, parent: int = p.ROOT_ID) -> tuple[int, int]:
        body = self.ok(p.CREATE, parent, p.CREATE_IN.pack(flags, 0o100000 | mode, 0, 0), name + b"\0")
        nodeid = p.ENTRY_OUT.unpack_from(body)[0]
        fh = p.OPEN_OUT.unpack_from(body, p.ENTRY_OUT.size)[0]
        return nodeid, fh

    def release(self, nodeid: int, fh: int) -> None:
        self.ok(p.RELEASE, nodeid, p.RELEASE_IN.pack(fh, 0, 0, 0))

    def forget(self, nodeid: int, count: int = 1) -> None:
        assert self.request(p.FORGET, nodeid, p.FORGET_IN.pack(count)) is None

    def readdir(self, nodeid: int, plus: bool = False, size: int = 65536) -> list[tuple[bytes, int, int]]:
        """[(name, entry nodeid (plus only), next offset)] of a whole directory."""
        fh = p.OPEN_OUT.unpack(self.ok(p.OPENDIR, nodeid, p.OPEN_IN.pack(0, 0)))[0]
        entries, offset = [], 0
        while True:
            body = self.ok(p.READDIRPLUS if plus else p.READDIR, nodeid, p.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))
            if not body:
                break
            position = 0
            while position < len(body):
                entry_id = 0
                if plus:
                    entry_id = p.ENTRY_OUT.unpack_from(body, position)[0]
                    position += p.ENTRY_OUT.size
                _ino, offset, namelen, _kind = p.DIRENT.unpack_from(body, position)
                name = body[position + p.DIRENT.size : position + p.DIRENT.size + namelen]
                entries.append((name, entry_id, offset))
                position += (p.DIRENT.size + namelen + 7) & ~7
        self.ok(p.RELEASEDIR, nodeid, p.RELEASE_IN.pack(fh, 0, 0, 0))
        return entries


def setattr_in(valid: int, *, fh: int = 0, size: int = 0, mode: int = 0, uid: int = 0, gid: int = 0) -> bytes:
    return p.SETATTR_IN.pack(valid, 0, fh, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, uid, gid, 0)


def names(*items: bytes) -> bytes:
    return b"".join(item + b"\0" for item in items)
