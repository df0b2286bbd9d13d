"""The command's stdin, stdout, stderr and exit status, as four files of a virtio-fs share.

The guest mounts this share on /run/pyvmm and runs the command with

    </run/pyvmm/stdin >/run/pyvmm/stdout 2>/run/pyvmm/stderr ; echo $? >/run/pyvmm/status

The files are not files: they are opened with FOPEN_DIRECT_IO and
FOPEN_STREAM, so every write(2) in the guest arrives here as one FUSE WRITE,
in order, and goes straight to pyvmm's own stdout or stderr, byte for byte;
nothing else is ever written there (the kernel log goes elsewhere). When
that output is gone (`pyvmm run ... | head`, head having exited) the write
fails with EPIPE and `output_closed` stops the run, as SIGPIPE would stop the
command on the host: a guest shell that shrugs off the error, as a shell's
builtin `echo` does, would otherwise print forever. A READ of
stdin is answered with what pyvmm's stdin has delivered so far, or, when
nothing has, later (a `Deferred` reply): the guest blocks in read(2) as it
would on a pipe, and other requests carry on meanwhile. End of file on
pyvmm's stdin is an empty reply, which the guest sees as end of file.
Writing a number to `status` ends the run with that status.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable

from vmm.fuse import protocol as p
from vmm.fuse.nodes import FuseError
from vmm.fuse.request import Deferred
from vmm.fuse.session import MAX_TRANSFER, Arguments, FuseSession
from vmm.host_output import HostOutput

log = logging.getLogger(__name__)

STDIN, STDOUT, STDERR, STATUS = 2, 3, 4, 5
FILES = {b"stdin": STDIN, b"stdout": STDOUT, b"stderr": STDERR, b"status": STATUS}
FOPEN_DIRECT_IO = 1 << 0
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_STREAM = 1 << 4
_STREAM_OPEN_FLAGS = FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE | FOPEN_STREAM


class InputPump:
    """pyvmm's stdin, read on a thread of its own once the guest first asks for it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._buffer = bytearray()
        self._eof = False
        self._waiting: deque[tuple[Deferred, int]] = deque()
        self._thread: threading.Thread | None = None

    def read(self, size: int) -> bytes | Deferred:
        with self._lock:
            if self._buffer or self._eof:
                data = bytes(self._buffer[:size])
                del self._buffer[:size]
                return data
            deferred = Deferred()
            self._waiting.append((deferred, size))
            if self._thread is None:
                # Daemon: a thread blocked reading a terminal cannot be woken;
                # it dies with the process.
                self._thread = threading.Thread(target=self._run, name="run-stdin", daemon=True)
                self._thread.start()
            return deferred

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError as err:
                log.info("reading stdin: %s", err)
                data = b""
            self._deliver(data)
            if not data:
                return

    def _deliver(self, data: bytes) -> None:
        answers = []
        with self._lock:
            if data:
                self._buffer += data
            else:
                self._eof = True
            while self._waiting and (self._buffer or self._eof):
                deferred, size = self._waiting.popleft()
                answers.append((deferred, bytes(self._buffer[:size])))
                del self._buffer[:size]
        for deferred, answer in answers:
            deferred.resolve(body=answer)


class StdioShare(FuseSession):
    def __init__(self, *, stdin_fd: int, stdout_fd: int, stderr_fd: int, on_status: Callable[[int], object],
                 output_closed: Callable[[str], object], give_up: Callable[[], bool]) -> None:
        """`output_closed(why)`: stdout or stderr is gone (vmm/host_output.py). `give_up()`:
        whether a write waiting for the host to read should drop its data (the run is stopping)."""
        super().__init__("pyvmm-io")
        self.input = InputPump(stdin_fd)
        self.outputs = {name: HostOutput(fd, output_closed, give_up)
                        for name, fd in ((STDOUT, stdout_fd), (STDERR, stderr_fd))}
        self.on_status = on_status
        self.started = time.time_ns()
        self._operations = {
            p.INIT: self._init, p.DESTROY: self._destroy, p.LOOKUP: self._lookup,
            p.FORGET: self._nothing, p.BATCH_FORGET: self._nothing, p.GETATTR: self._getattr,
            p.SETATTR: self._getattr, p.OPEN: self._open, p.READ: self._read, p.WRITE: self._write,
            p.RELEASE: self._nothing, p.FSYNC: self._nothing,
            p.ACCESS: self._nothing, p.STATFS: self._statfs,
        }

    def close(self) -> None:
        pass  # the fds are pyvmm's own stdio

    # -- names and attributes ----------------------------------------------------------

    def _attr(self, nodeid: int) -> tuple:
        if nodeid == p.ROOT_ID:
            mode, nlink = stat.S_IFDIR | 0o755, 2
        elif nodeid in FILES.values():
            mode, nlink = stat.S_IFREG | (0o444 if nodeid == STDIN else 0o222), 1
        else:
            raise FuseError(errno.ESTALE)
        seconds, nanoseconds = divmod(self.started, 1_000_000_000)
        return (nodeid, 0, 0, seconds, seconds, seconds, nanoseconds, nanoseconds, nanoseconds,
                mode, nlink, 0, 0, 0, 4096, 0)

    def _lookup(self, nodeid: int, args: Arguments) -> bytes:
        name = args.name()
        if nodeid != p.ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        if name not in FILES:
            raise FuseError(errno.ENOENT)
        # Never cached: each open asks again, so nothing the guest keeps goes stale.
        return p.ENTRY_OUT.pack(FILES[name], 0, 0, 0, 0, 0, *self._attr(FILES[name]))

    def _getattr(self, nodeid: int, args: Arguments) -> bytes:
        return p.ATTR_OUT.pack(0, 0, 0, *self._attr(nodeid))

    def _statfs(self, nodeid: int, args: Arguments) -> bytes:
        return p.STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0)

    def _nothing(self, nodeid: int, args: Arguments) -> None:
        self._attr(nodeid)  # the node has to exist

    # -- the streams ---------------------------------------------------------------------

    def _open(self, nodeid: int, args: Arguments) -> bytes:
        flags, _ = args.take(p.OPEN_IN)
        self._attr(nodeid)
        wants_write = flags & os.O_ACCMODE != os.O_RDONLY
        if nodeid == p.ROOT_ID or wants_write == (nodeid == STDIN) or flags & os.O_ACCMODE == os.O_RDWR:
            raise FuseError(errno.EACCES)
        return p.OPEN_OUT.pack(nodeid, _STREAM_OPEN_FLAGS, 0)  # the handle is the node ID

    def _read(self, nodeid: int, args: Arguments) -> bytes | Deferred:
        fh, _offset, size, *_ = args.take(p.READ_IN)
        if nodeid != STDIN or fh != STDIN:
            raise FuseError(errno.EBADF)
        return self.input.read(min(size, MAX_TRANSFER))

    def _write(self, nodeid: int, args: Arguments) -> bytes:
        fh, _offset, size, *_ = args.take(p.WRITE_IN)
        if fh != nodeid or nodeid not in (STDOUT, STDERR, STATUS):
            raise FuseError(errno.EBADF)
        if size > args.remaining or size > MAX_TRANSFER:
            raise FuseError(errno.EINVAL)
        if nodeid == STATUS:
            text = args.request.read(args.offset, min(size, 16)).strip()
            if not text.isdigit() or int(text) > 255:
                raise FuseError(errno.EINVAL)
            self.on_status(int(text))
            return p.WRITE_OUT.pack(size, 0)
        output = self.outputs[nodeid]
        with args.request.views(args.offset, size) as buffers:
            for buffer in buffers:
                # Another error (ENOSPC, with stdout a file) reaches the command as its write's error.
                if not output.write(buffer):
                    raise FuseError(errno.EPIPE)
        return p.WRITE_OUT.pack(size, 0)
