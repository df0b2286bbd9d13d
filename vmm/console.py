"""The host side of the serial console: the user's terminal (or a pipe) <-> the UART.

Output: `Console.write(data)` is the UART's (and virtio-console's) output
writer. Once the console is started, what the guest writes is gathered and
written within OUTPUT_DELAY_SECONDS by an output thread, or at once by the
writer when OUTPUT_BATCH bytes are waiting: a UART hands over one byte per
guest `out`, virtio-console a buffer per line or two, and two system calls
per write were most of what a printing guest cost. Whichever thread writes
makes the system calls itself (vmm/host_output.py), so a guest still waits
while the host does not read. When the output is gone (the reader of a pipe
exited, stdout was closed) the injected `output_failed(status, reason)` is
called once, with status 141 (vmm/exit_status.py), and guest output is
dropped from then on; any other write error (a full disk) calls it with
status 1. A stdout closed when pyvmm started fails the guest's first write,
not a later one of the output thread's. `stop()` writes what is left.

Input: a reader thread moves bytes from the input fd into the UART through
`receive(data) -> int` (how many bytes it took).

- When stdin is a terminal it is put in raw mode, so every key reaches the
  guest (Ctrl-C included, as with QEMU's serial console), and restored on
  every way out: `restore()` is idempotent and is called by the context
  manager, by `stop()`, and at exit; the caller's SIGTERM/SIGHUP handlers
  call it too. Ctrl-A is the escape key, as in QEMU: Ctrl-A x quits (the
  injected `quit()` callback), Ctrl-A h prints help, Ctrl-A Ctrl-A sends a
  literal Ctrl-A. The terminal is read even while the guest is not taking
  input, so the escape always works; what the guest cannot take is kept up
  to a bound and then dropped, like a UART overrun.
- When stdin is a pipe or a file, its bytes go to the guest verbatim and
  none are lost: while the UART is full the thread stops reading, so the
  writer on the other end blocks. It resumes when the UART calls
  `room_available()` (wire it as the UART's `room_available` callback).

No busy waiting: the thread sleeps in poll() on the input fd and a wake-up
pipe; `room_available()` and `stop()` write a byte to that pipe. poll, not
epoll, because stdin may be a regular file, which epoll refuses.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import select
import selectors
import termios
import threading
import time
import tty
from collections.abc import Callable

from vmm import exit_status
from vmm.host_output import HostOutput

log = logging.getLogger(__name__)

# Gathered output waits at most this long (a keystroke's echo too: well under
# what a person notices), or until this many bytes are waiting.
OUTPUT_DELAY_SECONDS = 0.002
OUTPUT_BATCH = select.PIPE_BUF
# How long a stopping machine waits for its output to drain before dropping what nobody reads.
OUTPUT_GRACE_SECONDS = 1.0

ESCAPE_KEY = 0x01  # Ctrl-A
READ_CHUNK = 4096
# In terminal mode, bytes the guest has not taken yet are kept up to this
# bound; beyond it typed (or pasted) input is dropped.
TERMINAL_PENDING_LIMIT = 64 * 1024

HELP_TEXT = (
    b"\r\nC-a h    print this help\r\nC-a x    exit pyvmm\r\nC-a C-a  send C-a to the guest\r\n"
)


class EscapeParser:
    """Splits terminal input into bytes for the guest and escape commands.

    The state (whether the last byte was the escape key) carries over between
    reads, so Ctrl-A and its command may arrive in different reads.
    """

    QUIT = "quit"
    HELP = "help"

    def __init__(self, escape_key: int = ESCAPE_KEY) -> None:
        self._escape_key = escape_key
        self._escaped = False

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        guest = bytearray()
        commands: list[str] = []
        escape = self._escape_key
        for byte in data:
            if self._escaped:
                self._escaped = False
                if byte == escape:
                    guest.append(escape)
                elif byte in (ord("x"), ord("X")):
                    commands.append(self.QUIT)
                elif byte in (ord("h"), ord("H"), ord("?")):
                    commands.append(self.HELP)
                # Any other key after the escape is swallowed, as QEMU does.
            elif byte == escape:
                self._escaped = True
            else:
                guest.append(byte)
        return bytes(guest), commands


class RawTerminal:
    """Raw mode on a terminal fd, restorable from anywhere, any number of times."""

    def __init__(self, fd: int, *, keep_signals: bool = False) -> None:
        self.fd = fd
        self._keep_signals = keep_signals
        self._saved: list | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self._saved is not None

    def enter(self) -> None:
        with self._lock:
            if self._saved is not None:
                return
            saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
            if self._keep_signals:
                # Let Ctrl-C / Ctrl-\ / Ctrl-Z signal pyvmm instead of reaching the guest.
                attrs = termios.tcgetattr(self.fd)
                attrs[3] |= termios.ISIG
                termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
            self._saved = saved
            atexit.register(self.restore)

    def restore(self) -> None:
        with self._lock:
            saved, self._saved = self._saved, None
        if saved is None:
            return
        atexit.unregister(self.restore)
        try:
            # TCSANOW, not TCSADRAIN: a terminal stopped with Ctrl-S must not
            # keep us from giving the user their terminal back.
            termios.tcsetattr(self.fd, termios.TCSANOW, saved)
        except (termios.error, OSError):
            pass  # the terminal is gone (hang-up): nothing left to restore


class Console:
    def __init__(
        self,
        quit: Callable[[], None],
        *,
        input_fd: int = 0,
        output_fd: int = 1,
        raw: bool | None = None,
        keep_signals: bool = False,
        notice_fd: int = 2,
        output_failed: Callable[[int, str], object] = lambda status, reason: None,
    ) -> None:
        """`raw`: put the input terminal in raw mode and honour Ctrl-A escapes;
        by default, exactly when the input fd is a terminal. `notice_fd`: where
        pyvmm's own one-line notices go (stderr, or pyvmm run's log).
        `output_failed(status, reason)`: the output cannot be written any more
        (by default its output is then dropped quietly)."""
        self._quit = quit
        self._input_fd = input_fd
        self._notice_fd = notice_fd
        self._output_failed = output_failed
        self._host_output = HostOutput(output_fd, closed=self._output_closed, give_up=lambda: self._discarding)
        self._output_writable = _open_for_writing(output_fd)
        is_tty = os.isatty(input_fd)
        self.interactive = is_tty if raw is None else raw
        self._terminal = (
            RawTerminal(input_fd, keep_signals=keep_signals)
            if is_tty and self.interactive
            else None
        )
        self._escapes = EscapeParser()

        self._receive: Callable[[bytes], int] | None = None
        self._pending = bytearray()  # input read but not yet taken by the guest
        self.max_pending = 0
        self._output_broken = False  # closed, or failed: guest output is dropped
        self._discarding = False  # stopping, and the output does not drain: give up on it

        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None

        # Output gathered for the output thread; the lock also keeps writes in order.
        self._output = bytearray()
        self._output_lock = threading.Lock()
        self._output_waiting = threading.Event()  # set when _output went from empty to not
        self._output_thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self, receive: Callable[[bytes], int]) -> None:
        """Enter raw mode (if interactive) and start feeding input to `receive`."""
        self._receive = receive
        self._output_thread = threading.Thread(target=self._write_gathered_output, name="console-output",
                                               daemon=True)
        self._output_thread.start()
        if self._terminal is not None:
            if _in_background(self._input_fd):
                # Changing or reading the terminal from a background job would
                # stop us with SIGTTOU/SIGTTIN: leave the terminal alone.
                log.info("console: running in the background, terminal input disabled")
                return
            self._terminal.enter()
        self._thread = threading.Thread(target=self._run, name="console-input", daemon=True)
        self._thread.start()

    def discard_output(self) -> None:
        """From now on drop guest output the host does not read, instead of waiting for room.

        For a machine that is stopping while a vCPU is stuck writing to a pipe
        nobody reads: it then returns from the write and can stop.
        """
        self._discarding = True

    def stop(self, *, drain: bool = False) -> None:
        """Stop the input thread, wait for it, write what output is left, and give the terminal back.

        `drain`: the guest ended itself, and its last output waits for the reader however long
        it takes (`pyvmm boot ... | less` with the user still on the first screen), as any
        writer to a pipe does, until `discard_output()` (a signal, Ctrl-A x). Without it (the
        host stopped the machine) output nobody takes within OUTPUT_GRACE_SECONDS is dropped.
        """
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            # It may wait for a device that is writing output (virtio-console's lock).
            self._join_or_discard(self._thread, drain)
        output_thread, self._output_thread = self._output_thread, None
        if output_thread is not None:
            self._output_waiting.set()
            self._join_or_discard(output_thread, drain)
        self.flush()
        self.restore()
        with self._wake_lock:
            if not self._wake_closed:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _join_or_discard(self, thread: threading.Thread, drain: bool) -> None:
        """Wait for `thread`; if it is still busy after OUTPUT_GRACE_SECONDS, output nobody reads
        holds it (or the writer it waits for: virtio-console on KVM's I/O thread): drop that
        output, unless draining. (The join is interrupted by signals, whose handler discards.)"""
        thread.join(OUTPUT_GRACE_SECONDS)
        if thread.is_alive() and not drain:
            self.discard_output()
        thread.join()

    def restore(self) -> None:
        """Put the terminal back as it was; safe from signal handlers, idempotent."""
        if self._terminal is not None:
            self._terminal.restore()

    @property
    def raw_mode_active(self) -> bool:
        return self._terminal is not None and self._terminal.active

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def room_available(self) -> None:
        """The UART has room again (its `room_available` callback); any thread."""
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_closed:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already

    # -- output --------------------------------------------------------------

    def notice(self, text: str) -> None:
        """One line of pyvmm's own (the terminal may be in raw mode)."""
        end = "\r\n" if self.raw_mode_active else "\n"
        try:
            os.write(self._notice_fd, f"pyvmm: {text}{end}".encode())
        except OSError:
            pass  # stderr is gone too (`pyvmm ... 2>&1 | head`): the notice with it

    def write(self, data: bytes) -> None:
        """Guest output to the host, all of it (the guest waits while the host does not read)."""
        if self._output_broken:
            return
        with self._output_lock:
            if not self._output_writable:
                # Closed when pyvmm started: fail this write, the guest's first, not a later one.
                self._output_writable = True
                self._output += data
                self._write_output()
                return
            was_empty = not self._output
            self._output += data
            if self._output_thread is not None and len(self._output) < OUTPUT_BATCH:
                if was_empty:
                    self._output_waiting.set()  # the output thread writes it shortly
                return
            self._write_output()

    def flush(self) -> None:
        """Write the output gathered so far."""
        with self._output_lock:
            self._write_output()

    def _write_gathered_output(self) -> None:
        while self._output_thread is not None:
            self._output_waiting.wait()
            time.sleep(OUTPUT_DELAY_SECONDS)  # let a burst gather
            self._output_waiting.clear()
            try:
                self.flush()
            except Exception:
                log.exception("console output thread failed")
                return

    def _write_output(self) -> None:
        """Write all of self._output; the caller holds self._output_lock."""
        data, self._output = self._output, bytearray()
        if self._output_broken:
            return
        try:
            self._host_output.write(data)
        except OSError as err:
            self._output_broken = True
            self._output_failed(exit_status.ERROR, f"cannot write the guest's output to "
                                                   f"{self._host_output.name}: {err.strerror}; stopped the guest")

    def _output_closed(self, why: str) -> None:
        self._output_broken = True
        log.debug("console output closed: %s", why)
        self._output_failed(exit_status.OUTPUT_CLOSED, f"{why}; stopped the guest")

    # -- input thread --------------------------------------------------------

    def _run(self) -> None:
        selector = selectors.PollSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        input_registered = False
        eof = False
        try:
            while not self._stopping:
                self._deliver()
                # A pipe is read only when the guest has taken everything:
                # that is the backpressure. A terminal is always read, for the escape.
                want_input = not eof and (self.interactive or not self._pending)
                if want_input and not input_registered:
                    selector.register(self._input_fd, selectors.EVENT_READ)
                    input_registered = True
                elif not want_input and input_registered:
                    selector.unregister(self._input_fd)
                    input_registered = False
                if eof and not self._pending:
                    return  # all input delivered; nothing more will come
                for key, _ in selector.select():
                    if key.fd == self._wake_r:
                        self._drain_wake_pipe()
                    elif not self._read_input():
                        eof = True
        except Exception:
            log.exception("console input thread failed")
        finally:
            selector.close()

    def _deliver(self) -> None:
        if self._pending and self._receive is not None:
            taken = self._receive(bytes(self._pending))
            del self._pending[:taken]

    def _read_input(self) -> bool:
        """Read one chunk; False at end of input."""
        try:
            data = os.read(self._input_fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return True  # a spurious wake-up on a non-blocking fd
        except OSError as err:
            if err.errno == errno.EIO:  # the terminal hung up
                return False
            raise
        if not data:
            return False
        if self.interactive:
            data, commands = self._escapes.feed(data)
            for command in commands:
                if command == EscapeParser.HELP:
                    self.write(HELP_TEXT)
                elif command == EscapeParser.QUIT:
                    self._stopping = True
                    self._quit()
                    return True
            room = TERMINAL_PENDING_LIMIT - len(self._pending)
            data = data[:room]  # the rest is dropped: the guest is not reading
        self._pending += data
        self.max_pending = max(self.max_pending, len(self._pending))
        return True

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass


def _open_for_writing(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    except OSError:
        return False  # closed


def _in_background(fd: int) -> bool:
    """Whether fd is our controlling terminal and another process group owns it."""
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False  # not our controlling terminal: no job control applies
