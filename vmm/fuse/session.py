"""One FUSE session: requests parsed, checked and dispatched, errors turned into replies.

`FuseSession.handle(request)` reads the header, checks its length against
the buffer, refuses everything before INIT, and calls the operation the
subclass registered for the opcode with (node ID, `Arguments`). An operation
returns the reply's body (bytes), a `FileRange` (data still in a host file),
a `Deferred` (answered later), or None; it fails by raising `FuseError` or
`OSError`, which become the reply's errno.

A malformed request (short header, a length past the buffer, arguments cut
short, a name without its NUL, an unknown opcode) gets an error reply; no
request can raise out of `handle`.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable

from devices.log_once import LogOnce
from vmm.fuse import protocol as p
from vmm.fuse.nodes import FuseError
from vmm.fuse.request import Deferred, FileRange, Reply, Request

log = logging.getLogger(__name__)

NAME_MAX = 255
# The most data one READ or WRITE moves (256 pages): what INIT tells the kernel.
MAX_TRANSFER = 1 << 20
MAX_PAGES = MAX_TRANSFER // 4096

Operation = Callable[[int, "Arguments"], object]


class Arguments:
    """The bytes after the header, read front to back; running short is EINVAL."""

    def __init__(self, request: Request, offset: int, end: int) -> None:
        self.request = request
        self.offset = offset
        self.end = end

    @property
    def remaining(self) -> int:
        return self.end - self.offset

    def take(self, layout: struct.Struct) -> tuple:
        if self.remaining < layout.size:
            raise FuseError(errno.EINVAL)
        values = layout.unpack(self.request.read(self.offset, layout.size))
        self.offset += layout.size
        return values

    def name(self) -> bytes:
        """One NUL-terminated name: a single path component."""
        data = self.request.read(self.offset, min(self.remaining, NAME_MAX + 1))
        end = data.find(b"\0")
        if end < 0:
            raise FuseError(errno.EINVAL if len(data) <= NAME_MAX else errno.ENAMETOOLONG)
        name = data[:end]
        self.offset += end + 1
        if not name or name in (b".", b"..") or b"/" in name:
            raise FuseError(errno.EINVAL)
        return name

    def text(self, limit: int = 4096) -> bytes:
        """A NUL-terminated string that may hold '/' (a symlink's target)."""
        data = self.request.read(self.offset, min(self.remaining, limit + 1))
        end = data.find(b"\0")
        if end <= 0:
            raise FuseError(errno.EINVAL if end == 0 or len(data) <= limit else errno.ENAMETOOLONG)
        self.offset += end + 1
        return data[:end]


class FuseSession:
    def __init__(self, name: str) -> None:
        self.init_flags = 0  # the INIT flags the subclass supports (granted when the kernel offers them)
        self.initialised = False
        self.requests = 0
        self.errors = 0
        self._odd = LogOnce(log, name)
        self._operations: dict[int, Operation] = {}

    def forget_everything(self) -> None:
        """Drop every node and handle (a new session started, or the old one ended)."""

    # -- one request ---------------------------------------------------------------

    def handle(self, request: Request) -> Reply | Deferred | None:
        """Carry out one request; the reply, or None for FORGET and BATCH_FORGET."""
        self.requests += 1
        if request.length < p.IN_HEADER.size:
            self._odd("short", "request of %d bytes is shorter than a FUSE header", request.length)
            self.errors += 1
            return Reply(0, errno.EINVAL)
        length, opcode, unique, nodeid, _uid, _gid, _pid, _extlen, _ = p.IN_HEADER.unpack(
            request.read(0, p.IN_HEADER.size))
        if not p.IN_HEADER.size <= length <= request.length:
            self._odd("length", "request length %d does not fit its %d-byte buffer", length, request.length)
            self.errors += 1
            return None if opcode in p.NO_REPLY else Reply(unique, errno.EINVAL)
        operation = self._operations.get(opcode)
        if opcode in p.UNSUPPORTED and operation is None:
            return Reply(unique, errno.ENOSYS)  # expected: the kernel then stops asking
        if operation is None:
            self._odd(f"opcode-{opcode}", "unsupported FUSE opcode %d", opcode)
            return Reply(unique, errno.ENOSYS)
        if not self.initialised and opcode != p.INIT:
            return None if opcode in p.NO_REPLY else Reply(unique, errno.EIO)
        args = Arguments(request, p.IN_HEADER.size, length)
        try:
            result = operation(nodeid, args)
        except FuseError as err:
            return self._failed(opcode, unique, err.errno)
        except OSError as err:
            return self._failed(opcode, unique, err.errno or errno.EIO)
        except Exception:  # a bug must not take the VMM down with it; the guest sees EIO
            log.exception("FUSE opcode %d failed", opcode)
            return self._failed(opcode, unique, errno.EIO)
        if opcode in p.NO_REPLY:
            return None
        if isinstance(result, FileRange):
            return Reply(unique, file_data=result)
        if isinstance(result, Deferred):
            result.unique = unique
            return result
        return Reply(unique, body=result or b"")

    def _failed(self, opcode: int, unique: int, code: int) -> Reply | None:
        self.errors += 1
        return None if opcode in p.NO_REPLY else Reply(unique, code)

    def _init(self, nodeid: int, args: Arguments) -> bytes:
        major, minor, max_readahead, flags = args.take(p.INIT_IN)
        if major != p.KERNEL_VERSION:
            # Only 7.x exists; a kernel speaking another major gets ours and retries or gives up.
            return p.INIT_OUT.pack(p.KERNEL_VERSION, p.KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        self.forget_everything()
        self.initialised = True
        return p.INIT_OUT.pack(p.KERNEL_VERSION, min(minor, p.KERNEL_MINOR_VERSION), max_readahead,
                               flags & self.init_flags, 16, 12, MAX_TRANSFER, 1, MAX_PAGES, 0, 0)

    def _destroy(self, nodeid: int, args: Arguments) -> bytes:
        self.forget_everything()
        self.initialised = False
        return b""
