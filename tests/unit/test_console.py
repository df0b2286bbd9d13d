"""The host console: raw mode on a pty, the Ctrl-A escape, pipe input with backpressure, output."""

from __future__ import annotations

import contextlib
import os
import select
import termios
import threading
import time

import pytest

from tests.helpers import full_pipe
from vmm.console import (
    HELP_TEXT,
    OUTPUT_BATCH,
    OUTPUT_GRACE_SECONDS,
    READ_CHUNK,
    Console,
    EscapeParser,
    RawTerminal,
)

HANG_GUARD = 10  # seconds; only keeps a broken build from hanging, never asserted on


class Collector:
    """A receive() that takes everything and lets a test wait for bytes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._cond = threading.Condition()

    def __call__(self, data: bytes) -> int:
        with self._cond:
            self.data += data
            self._cond.notify_all()
        return len(data)

    def wait_for(self, size: int) -> bytes:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.data) >= size, HANG_GUARD)
            return bytes(self.data)


class SlowUart:
    """A receiver with a small buffer that a "guest" thread drains a little at a time."""

    def __init__(self, capacity: int, room_available) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.received = bytearray()
        self.room_available = room_available
        self.refused = False
        self._cond = threading.Condition()

    def receive(self, data: bytes) -> int:
        with self._cond:
            taken = min(len(data), self.capacity - len(self.buffer))
            self.buffer += data[:taken]
            if taken < len(data):
                self.refused = True
            self._cond.notify_all()
            return taken

    def guest_reads(self, total: int) -> None:
        while len(self.received) < total:
            with self._cond:
                assert self._cond.wait_for(lambda: self.buffer, HANG_GUARD)
                chunk = bytes(self.buffer[:7])
                del self.buffer[:7]
                notify = self.refused
                self.refused = False
            self.received += chunk
            if notify:
                self.room_available()


@pytest.fixture
def pty_pair():
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def read_from(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += os.read(fd, size - len(data))
    return data


# The escape parser.


def test_plain_bytes_pass_through() -> None:
    assert EscapeParser().feed(b"ls -l\r") == (b"ls -l\r", [])


def test_ctrl_a_x_quits() -> None:
    assert EscapeParser().feed(b"ab\x01xcd") == (b"abcd", ["quit"])


def test_ctrl_a_ctrl_a_sends_one_ctrl_a() -> None:
    assert EscapeParser().feed(b"\x01\x01\x01\x01") == (b"\x01\x01", [])


def test_ctrl_a_h_asks_for_help() -> None:
    assert EscapeParser().feed(b"\x01h\x01?") == (b"", ["help", "help"])


def test_escape_split_across_reads() -> None:
    parser = EscapeParser()
    assert parser.feed(b"a\x01") == (b"a", [])
    assert parser.feed(b"x") == (b"", ["quit"])


def test_unknown_escape_is_swallowed() -> None:
    assert EscapeParser().feed(b"\x01zq") == (b"q", [])


# Raw mode on a pty.


def test_raw_mode_set_and_restored(pty_pair) -> None:
    _, slave = pty_pair
    before = termios.tcgetattr(slave)
    terminal = RawTerminal(slave)
    terminal.enter()
    lflag = termios.tcgetattr(slave)[3]
    assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)
    terminal.restore()
    assert termios.tcgetattr(slave) == before
    terminal.restore()  # idempotent
    assert termios.tcgetattr(slave) == before


def test_keep_signals_leaves_isig_on(pty_pair) -> None:
    _, slave = pty_pair
    terminal = RawTerminal(slave, keep_signals=True)
    terminal.enter()
    attrs = termios.tcgetattr(slave)
    terminal.restore()
    assert attrs[3] & termios.ISIG
    assert not attrs[3] & termios.ICANON


def test_console_on_a_terminal_escapes_and_restores(pty_pair) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    quit_called = threading.Event()
    collector = Collector()
    console = Console(quit_called.set, input_fd=slave, output_fd=slave)
    assert console.interactive
    console.start(collector)
    assert console.raw_mode_active
    assert not termios.tcgetattr(slave)[3] & termios.ICANON

    os.write(master, b"ab\x01\x01c\x03")  # Ctrl-C goes to the guest in raw mode
    assert collector.wait_for(5) == b"ab\x01c\x03"

    os.write(master, b"\x01h")
    assert read_from(master, len(HELP_TEXT)) == HELP_TEXT

    os.write(master, b"\x01x")
    assert quit_called.wait(HANG_GUARD)
    console.stop()
    assert termios.tcgetattr(slave) == before
    assert not console.raw_mode_active
    assert collector.data == b"ab\x01c\x03"


def test_context_manager_restores_the_terminal_on_error(pty_pair) -> None:
    _, slave = pty_pair
    before = termios.tcgetattr(slave)
    with pytest.raises(RuntimeError):
        with Console(lambda: None, input_fd=slave, output_fd=slave) as console:
            console.start(Collector())
            raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == before


def test_restore_from_a_signal_path_before_stop(pty_pair) -> None:
    _, slave = pty_pair
    before = termios.tcgetattr(slave)
    console = Console(lambda: None, input_fd=slave, output_fd=slave)
    console.start(Collector())
    console.restore()  # what a SIGTERM handler calls
    assert termios.tcgetattr(slave) == before
    console.stop()
    assert termios.tcgetattr(slave) == before


def test_output_goes_to_the_terminal_untranslated(pty_pair) -> None:
    master, slave = pty_pair
    console = Console(lambda: None, input_fd=slave, output_fd=slave)
    console.start(Collector())
    # Raw mode leaves the guest's bytes alone: no "\n" -> "\r\n" translation.
    console.write(b"guest says hi\r\n")
    assert read_from(master, 15) == b"guest says hi\r\n"
    console.stop()


# Pipes.


def test_pipe_input_is_fed_verbatim_without_escapes() -> None:
    read_end, write_end = os.pipe()
    collector = Collector()
    console = Console(lambda: pytest.fail("a pipe has no escape"), input_fd=read_end, output_fd=1)
    assert not console.interactive
    console.start(collector)
    os.write(write_end, b"echo hi\n\x01x\x01\x01")
    os.close(write_end)
    assert collector.wait_for(12) == b"echo hi\n\x01x\x01\x01"
    console.stop()
    os.close(read_end)


def test_pipe_backpressure_loses_nothing_and_bounds_memory() -> None:
    read_end, write_end = os.pipe()
    payload = bytes((i * 7) & 0xFF for i in range(256 * 1024))
    console = Console(lambda: None, input_fd=read_end, output_fd=1)
    uart = SlowUart(capacity=64, room_available=console.room_available)
    console.start(uart.receive)

    def writer() -> None:
        view = memoryview(payload)
        while view:
            view = view[os.write(write_end, view[:65536]) :]
        os.close(write_end)

    feeder = threading.Thread(target=writer)
    feeder.start()
    uart.guest_reads(len(payload))
    feeder.join(HANG_GUARD)
    assert bytes(uart.received) == payload
    # The thread stopped reading while the guest was full, so the console
    # never held more than one read's worth.
    assert console.max_pending <= READ_CHUNK
    console.stop()
    os.close(read_end)


def test_stop_wakes_an_idle_reader_and_joins_it() -> None:
    read_end, write_end = os.pipe()
    console = Console(lambda: None, input_fd=read_end, output_fd=1)
    console.start(Collector())
    console.stop()
    assert console._thread is not None and not console._thread.is_alive()  # noqa: SLF001
    os.close(read_end)
    os.close(write_end)


def test_reader_ends_by_itself_at_end_of_file(tmp_path) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"from a file\n")  # a regular file: epoll would refuse it
    collector = Collector()
    with open(path, "rb") as file:
        console = Console(lambda: None, input_fd=file.fileno(), output_fd=1)
        console.start(collector)
        assert collector.wait_for(12) == b"from a file\n"
        console._thread.join(HANG_GUARD)  # noqa: SLF001
        assert not console._thread.is_alive()  # noqa: SLF001
        console.stop()


def test_room_available_after_stop_is_harmless() -> None:
    read_end, write_end = os.pipe()
    console = Console(lambda: None, input_fd=read_end, output_fd=1)
    collector = Collector()
    console.start(collector)
    console.stop()
    os.write(write_end, b"late")
    console.room_available()  # must neither raise nor restart reading
    assert not console._thread.is_alive()  # noqa: SLF001
    assert collector.data == b""
    assert os.read(read_end, 16) == b"late"  # still in the pipe: nobody read it
    os.close(read_end)
    os.close(write_end)


# Output.


def test_write_finishes_partial_writes_on_a_nonblocking_pipe() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    payload = os.urandom(1 << 20)  # far more than a pipe holds: EAGAIN on the way
    received = bytearray()

    def reader() -> None:
        while len(received) < len(payload):
            received.extend(os.read(read_end, 65536))

    drain = threading.Thread(target=reader)
    drain.start()
    console = Console(lambda: None, input_fd=read_end, output_fd=write_end, raw=False)
    console.write(payload)
    drain.join(HANG_GUARD)
    assert bytes(received) == payload
    console.stop()
    os.close(read_end)
    os.close(write_end)


def test_write_to_a_closed_reader_reports_it_once_and_drops_output(monkeypatch) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    null_in = os.open(os.devnull, os.O_RDONLY)
    failures = []
    console = Console(lambda: None, input_fd=null_in, output_fd=write_end,
                      output_failed=lambda status, reason: failures.append((status, reason)))
    attempts = []
    real_write = os.write

    def counting_write(fd, data):
        if fd == write_end:
            attempts.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    console.write(b"nobody listens")  # EPIPE: no exception, and no SIGPIPE kills us
    console.write(b"still nobody")  # dropped without trying the pipe again
    assert attempts == [b"nobody listens"]
    assert failures == [(141, f"fd {write_end} was closed (Broken pipe); stopped the guest")]
    console.stop()
    os.close(write_end)
    os.close(null_in)


def test_a_notice_to_a_closed_stderr_is_dropped_without_an_exception() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    null = os.open(os.devnull, os.O_RDONLY)
    console = Console(lambda: None, input_fd=null, output_fd=null, notice_fd=write_end, raw=False)
    console.notice("using the software CPU")  # `pyvmm boot ... 2>&1 | head`, head gone
    os.close(write_end)
    os.close(null)


def test_pipe_through_the_real_uart_loses_nothing() -> None:
    from devices.uart import LSR, LSR_DR, RBR, Uart16550
    from vmm.bus import NullIrqLine

    read_end, write_end = os.pipe()
    payload = bytes((i * 13) & 0xFF for i in range(64 * 1024))
    console = Console(lambda: None, input_fd=read_end, output_fd=1)
    uart = Uart16550(
        NullIrqLine(), console.write, host_buffer_size=256, room_available=console.room_available
    )
    console.start(uart.receive)

    def writer() -> None:
        view = memoryview(payload)
        while view:
            view = view[os.write(write_end, view) :]
        os.close(write_end)

    feeder = threading.Thread(target=writer)
    feeder.start()
    got = bytearray()
    give_up = time.monotonic() + 60  # hang guard only
    while len(got) < len(payload):  # the guest polls LSR.DR like a simple driver
        assert time.monotonic() < give_up, "input stalled"
        if uart.read(LSR, 1) & LSR_DR:
            got.append(uart.read(RBR, 1))
    feeder.join(HANG_GUARD)
    console.stop()
    os.close(read_end)
    assert bytes(got) == payload
    assert uart.overruns == 0


def test_background_detection_on_a_controlling_terminal() -> None:
    import pty

    from vmm.console import _in_background

    pid, master = pty.fork()  # the child is a session leader on a new pty
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            foreground = not _in_background(0)
            grandchild = os.fork()
            if grandchild == 0:
                os.setpgid(0, 0)  # a new process group: a background job
                os._exit(1 if _in_background(0) else 0)
            _, status = os.waitpid(grandchild, 0)
            background = os.waitstatus_to_exitcode(status) == 1
            os._exit(10 + 2 * background + foreground)
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.waitstatus_to_exitcode(status) == 13  # foreground seen as such, background too


def test_output_from_several_threads_at_once_arrives_whole():
    # The UART (a vCPU thread) and virtio-console (the I/O thread) share the writer.
    read_fd, write_fd = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    console = Console(lambda: None, input_fd=null, output_fd=write_fd, raw=False)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_read_all(read_fd)))
    reader.start()
    writers = [threading.Thread(target=lambda n=n: [console.write(bytes([65 + n]) * 100) for _ in range(200)])
               for n in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    os.close(write_fd)
    os.close(null)
    reader.join()
    assert sorted(set(received)) == [65, 66, 67, 68] and len(received) == 4 * 200 * 100


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_output_is_gathered_yet_arrives_unprompted_and_in_order():
    # A UART's bytes and virtio-console's short buffers wait for the output thread
    # (no stop, no further write needed); a write that fills the batch goes out at
    # once, after them.
    read_fd, write_fd = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    console = Console(lambda: None, input_fd=null, output_fd=write_fd, raw=False)
    console.start(lambda data: len(data))
    try:
        for byte in b"spinning\n":
            console.write(bytes([byte]))
        received = b""
        while len(received) < len(b"spinning\n") and select.select([read_fd], [], [], 30)[0]:
            received += os.read(read_fd, 64)  # what the output thread wrote, unprompted
        assert received == b"spinning\n"
        console.write(b"a")
        console.write(b"bc\n")
        received = b""
        while len(received) < 4 and select.select([read_fd], [], [], 30)[0]:
            received += os.read(read_fd, 64)
        assert received == b"abc\n"
        console.write(b"d")
        console.write(b"e" * OUTPUT_BATCH)
        received = b""
        while select.select([read_fd], [], [], 0)[0]:  # in the pipe already, without waiting for the thread
            received += os.read(read_fd, 2 * OUTPUT_BATCH)
        assert received == b"d" + b"e" * OUTPUT_BATCH
    finally:
        console.stop()
        os.close(null)
        os.close(write_fd)
        os.close(read_fd)


def test_stop_writes_what_was_gathered():
    read_fd, write_fd = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    console = Console(lambda: None, input_fd=null, output_fd=write_fd, raw=False)
    console.start(lambda data: len(data))
    for byte in b"last words":
        console.write(bytes([byte]))
    console.stop()
    os.close(write_fd)
    os.close(null)
    assert _read_all(read_fd) == b"last words"


def test_stop_ends_though_nobody_reads_and_no_vcpu_is_blocked():
    # virtio-console on KVM writes from the I/O thread: with the output thread stuck on
    # a full pipe and that thread waiting behind it, no vCPU is stuck to tell shutdown
    # to drop the output. stop() must end anyway, dropping what nobody reads.
    read_fd, write_fd = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    os.set_blocking(write_fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_fd, bytes(65536))  # nobody reads: the pipe is full
    os.set_blocking(write_fd, True)
    console = Console(lambda: None, input_fd=null, output_fd=write_fd, raw=False)
    console.start(lambda data: len(data))
    try:
        console.write(b"gathered")  # the output thread takes it, and waits for room
        io_thread = threading.Thread(target=console.write, args=(b"i" * OUTPUT_BATCH,), daemon=True)
        io_thread.start()  # a batch: written by the writer itself, behind the output thread
        stopper = threading.Thread(target=console.stop, daemon=True)
        stopper.start()
        stopper.join(HANG_GUARD)
        assert not stopper.is_alive()
        io_thread.join(HANG_GUARD)
        assert not io_thread.is_alive()
    finally:
        os.close(null)
        os.close(write_fd)
        os.close(read_fd)


def test_a_reader_that_pauses_still_gets_the_guests_last_words():
    # `pyvmm boot ... | less`: the pipe is full, the user is still on the first screen, and the
    # guest prints its last line and powers off. As for `cat big | less`, the line must wait for
    # the reader (the README: the output is held back "as a pipe holds back any writer"), not be
    # dropped a second after the stop (Machine.shutdown drains when the guest ended itself).
    read_fd, write_fd, earlier = full_pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    console = Console(lambda: None, input_fd=null, output_fd=write_fd, raw=False)
    console.start(lambda data: len(data))
    reader_may_go = threading.Event()
    got = bytearray()

    def reader() -> None:
        reader_may_go.wait(HANG_GUARD)
        while chunk := os.read(read_fd, 65536):
            got.extend(chunk)

    reading = threading.Thread(target=reader, daemon=True)
    reading.start()
    console.write(b"the last words\n")
    stopper = threading.Thread(target=lambda: console.stop(drain=True), daemon=True)
    stopper.start()
    stopper.join(OUTPUT_GRACE_SECONDS + 1)  # past the grace: a console that drops has dropped by now
    assert stopper.is_alive()  # still waiting for the reader
    reader_may_go.set()
    stopper.join(HANG_GUARD)
    os.close(write_fd)
    reading.join(HANG_GUARD)
    os.close(null)
    os.close(read_fd)
    assert bytes(got[earlier:]) == b"the last words\n"


def test_a_drain_nobody_reads_ends_when_the_host_gives_up():
    # The guest ended, its last output waits for a reader that never reads (`pyvmm boot ... |
    # sleep 1000`): as `cat big | sleep 1000` would, until the user interrupts (the signal's
    # handler, vmm/session.stop_current, calls discard_output).
    read_fd, write_fd, _ = full_pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    console = Console(lambda: None, input_fd=null, output_fd=write_fd, raw=False)
    console.start(lambda data: len(data))
    try:
        console.write(b"never read\n")
        stopper = threading.Thread(target=lambda: console.stop(drain=True), daemon=True)
        stopper.start()
        stopper.join(OUTPUT_GRACE_SECONDS + 0.5)
        assert stopper.is_alive()
        console.discard_output()
        stopper.join(HANG_GUARD)
        assert not stopper.is_alive()
    finally:
        os.close(null)
        os.close(write_fd)
        os.close(read_fd)
