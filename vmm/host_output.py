"""Writing guest output to one of pyvmm's own fds (stdout, stderr), and what happens when it is gone.

The serial console (vmm/console.py) and `pyvmm run`'s stdio share
(vmm/run/stdio_share.py) write what the guest prints to pyvmm's stdout. That
fd is shared with the shell that started us, so it stays blocking; a write
waits for room with poll() first, looking every OUTPUT_RECHECK_SECONDS
whether it should give up (the machine is stopping and nobody reads): a write
blocked in the kernel could not be interrupted by a stop. Output that the
reader takes is written even then. Partial writes are
finished and EAGAIN is waited out, for a caller that left the fd non-blocking.

When the reader is gone (EPIPE: `pyvmm ... | head` after head exited), the
fd was closed when pyvmm started (EBADF, see `reserve_standard_fds`) or its
terminal hung up (EIO), the output is closed for good: `closed(why)` is
called once and everything after is dropped. Python ignores SIGPIPE, so
EPIPE arrives here as an error rather than killing pyvmm. Any other error
(ENOSPC on a full disk, ...) is the caller's to handle.

Everything else pyvmm prints, a command's own output (`pyvmm check`, `pyvmm
img info`, click's --help) and its one-line messages, goes through sys.stdout
and sys.stderr, which `use_standard_streams` replaces at start with streams
that write each piece at once (there is no buffer to fail later, at exit). A
stdout that is gone raises `OutputClosed`, which ends the command with status
141 and one line, as `pyvmm boot ... | head` ends; another write error raises a
PyvmmError (status 1). A stderr that is gone swallows what is written to it:
a message that cannot be shown must not replace the status it explains.
"""

from __future__ import annotations

import errno
import io
import os
import select
import sys
import threading
from collections.abc import Callable

from vmm import exit_status
from vmm.errors import PyvmmError

# How often a write waiting for room looks whether it should give up.
OUTPUT_RECHECK_SECONDS = 0.2
# The errors that mean nobody will ever read this fd's output again.
CLOSED_ERRORS = (errno.EPIPE, errno.EBADF, errno.EIO)
_NAMES = {1: "stdout", 2: "stderr"}


class HostOutput:
    def __init__(self, fd: int, closed: Callable[[str], object], give_up: Callable[[], bool]) -> None:
        """`closed(why)`: called once when the output is gone, `why` being e.g. "stdout was closed
        (Broken pipe)". `give_up()`: whether a write that finds no room should drop its data."""
        self.fd = fd
        self.name = _NAMES.get(fd, f"fd {fd}")
        self._closed = closed
        self._give_up = give_up
        self.is_closed = False
        # A poll object refuses concurrent use: one per writing thread.
        self._polls = threading.local()

    def write(self, data: bytes | memoryview) -> bool:
        """Write all of `data`; False when it was dropped (the output is closed, or given up on).
        Raises OSError for an error other than a closed output."""
        view = memoryview(data)
        while view:
            if self.is_closed:
                return False
            if not self._ready():
                if self._give_up():
                    return False  # still no room, and no more waiting for it
                continue
            try:
                # Room for at least PIPE_BUF bytes, so this does not block.
                written = os.write(self.fd, view[: select.PIPE_BUF])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                if err.errno not in CLOSED_ERRORS:
                    raise
                self._close(err)
                return False
            view = view[written:]
        return True

    def _close(self, err: OSError) -> None:
        if not self.is_closed:
            self.is_closed = True
            self._closed(closed_reason(self.name, err))

    def _ready(self) -> bool:
        """Whether the fd has room, waiting up to OUTPUT_RECHECK_SECONDS."""
        poller = getattr(self._polls, "poller", None)
        if poller is None:
            poller = self._polls.poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
        return bool(poller.poll(OUTPUT_RECHECK_SECONDS * 1000))


def closed_reason(name: str, err: OSError) -> str:
    """e.g. "stdout was closed (Broken pipe)": the first half of the line a closed output ends with."""
    return f"{name} was closed ({os.strerror(err.errno)})"


class OutputClosed(PyvmmError):
    """A command's stdout is gone (its reader exited, or it was closed): status 141, like the guest's output."""

    exit_status = exit_status.OUTPUT_CLOSED


class _FdWriter(io.RawIOBase):
    """Writes go whole to `fd` at once; an error goes to `failed(err)`, which raises or drops the data."""

    def __init__(self, fd: int, failed: Callable[[OSError], None]) -> None:
        super().__init__()
        self._fd = fd
        self._failed = failed

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as err:
            self._failed(err)
        return len(data)


def _stdout_failed(err: OSError) -> None:
    if err.errno in CLOSED_ERRORS:
        raise OutputClosed(closed_reason("stdout", err)) from None
    raise PyvmmError(f"cannot write to stdout: {os.strerror(err.errno)}") from None


def _stderr_failed(err: OSError) -> None:
    """Nothing: a message with nowhere to go is dropped (vmm/errors.py's to_stderr does the same)."""


def use_standard_streams() -> None:
    """sys.stdout and sys.stderr as pyvmm's commands write to them: see the module's docstring.

    Call after `reserve_standard_fds`: a stdout closed at start is then /dev/null opened
    read-only, whose writes fail with EBADF (status 141), as the guest's output does.
    """
    for name, fd, failed, default_errors in (("stdout", 1, _stdout_failed, "strict"),
                                             ("stderr", 2, _stderr_failed, "backslashreplace")):
        previous = getattr(sys, name)  # None when the fd was closed at start
        stream = io.TextIOWrapper(_FdWriter(fd, failed), encoding=getattr(previous, "encoding", None),
                                  errors=getattr(previous, "errors", None) or default_errors, write_through=True)
        setattr(sys, name, stream)


def reserve_standard_fds() -> None:
    """Put /dev/null on stdin, stdout or stderr where pyvmm started with it closed (`>&-`).

    Otherwise the next fd pyvmm opens (a pipe, a disk image) would get its
    number and receive the guest's output. stdout's /dev/null is opened
    read-only, so that writing to it still fails with EBADF, as writing to a
    closed stdout does: the guest is stopped when it writes to it (status 141).
    stdin reads end of file; stderr's lines are lost.
    """
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_RDONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, mode)  # the lowest free number: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # a standard fd, like the others
