"""pyvmm ends, never hangs, when the guest's console output has nowhere to go.

`pyvmm boot ... | head` after head exited, and `pyvmm boot ... >&-`: the guest
is stopped with status 141 (what a shell reports for a writer SIGPIPE killed)
and one line on stderr. The subprocess timeouts bound a hang; they are not
timing assertions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import termios

import pytest

from tests.guest.hello_image import hello_image
from tests.helpers import REPO, full_pipe
from vmm.console import OUTPUT_GRACE_SECONDS
from vmm.exit_status import INTERRUPTED, TIMED_OUT

CLOSED = 141


def pyvmm_boot(image, accel: str, stdin=subprocess.DEVNULL, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmm", "boot", "--flat", str(image), "--accel", accel],
                            stdin=stdin, cwd=REPO, **popen)


def finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_guest_printing_forever_is_stopped_when_the_reader_of_its_output_exits(guest, accel):
    # `pyvmm boot --flat flood.bin | head -c 100`
    process = pyvmm_boot(guest("flood"), accel, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"flooding\n"
    assert process.stdout.read(100) == b"x" * 100
    process.stdout.close()  # head has what it wanted and exits
    status = finish(process)
    assert status == CLOSED
    assert process.stderr.read() == b"pyvmm: stdout was closed (Broken pipe); stopped the guest\n"


def test_stderr_on_the_same_closed_pipe_ends_it_the_same_way(guest, accel):
    # `pyvmm boot ... 2>&1 | head`: the line saying why has nowhere to go either.
    process = pyvmm_boot(guest("flood"), accel, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout.readline() == b"flooding\n"
    process.stdout.close()
    assert finish(process) == CLOSED


@pytest.mark.parametrize("name", ["hello", "flood"])
def test_a_stdout_closed_at_start_stops_the_guest_at_its_first_write(guest, accel, name):
    # `pyvmm boot ... >&-`: hello.S prints one line, then exits with 42 through the
    # debug-exit port; it never gets there.
    process = pyvmm_boot(guest(name), accel, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=lambda: os.close(1))
    status = finish(process)
    assert status == CLOSED
    assert process.stderr.read() == b"pyvmm: stdout was closed (Bad file descriptor); stopped the guest\n"


def test_a_stdout_that_cannot_be_written_stops_the_guest_with_status_1(guest, accel):
    with open("/dev/full", "wb") as full:
        process = pyvmm_boot(guest("flood"), accel, stdout=full, stderr=subprocess.PIPE)
        status = finish(process)
    assert status == 1
    assert process.stderr.read() == (b"pyvmm: cannot write the guest's output to stdout: No space left on device; "
                                     b"stopped the guest\n")


def test_a_guest_that_prints_a_little_to_a_pipe_nobody_reads_still_ends(guest, accel):
    # `pyvmm boot --flat hello.bin | true`: whether the guest's exit (42) or the
    # broken pipe comes first is a race, as for `echo hi | true`; either way
    # pyvmm ends, with one of the two and no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = pyvmm_boot(guest("hello"), accel, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    status = finish(process)
    stderr = process.stderr.read()
    assert (status, stderr) in [(42, b""), (CLOSED, b"pyvmm: stdout was closed (Broken pipe); stopped the guest\n")]


def test_the_terminal_is_restored_when_the_reader_exits(guest, accel):
    # `pyvmm boot ... | head` typed at a terminal: stdin is the terminal, in raw mode while the guest runs.
    controller, terminal = os.openpty()
    try:
        before = termios.tcgetattr(terminal)
        process = pyvmm_boot(guest("flood"), accel, stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout.readline() == b"flooding\n"
        assert termios.tcgetattr(terminal) != before  # raw
        process.stdout.close()
        assert finish(process) == CLOSED
        assert termios.tcgetattr(terminal) == before
    finally:
        os.close(controller)
        os.close(terminal)


@pytest.mark.parametrize("status", [42, TIMED_OUT, INTERRUPTED])
def test_a_reader_that_pauses_still_gets_the_last_line_and_the_guests_status(tmp_path, accel, status):
    # `pyvmm boot --flat hello.bin | less`, the user still on the first screen: hello.S prints one
    # line and exits with 42. The line waits for the reader, as `cat big | less`'s output does,
    # past the grace a stop the host asks for would give it (OUTPUT_GRACE_SECONDS). So it does
    # when the guest itself chooses the status of a host stop (124 for --timeout, 130 for Ctrl-C).
    image = tmp_path / "hello.bin"
    image.write_bytes(hello_image(status))
    read_end, write_end, earlier = full_pipe()
    try:
        process = pyvmm_boot(image, accel, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=OUTPUT_GRACE_SECONDS + 2)  # it waits for the reader...
        with os.fdopen(read_end, "rb") as reader:
            output = reader.read()  # ...which reads at last
        assert finish(process) == status
        assert output[earlier:] == b"Hello from real mode\n"
        assert process.stderr.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_an_interrupt_ends_the_wait_for_a_reader_that_never_reads(guest, accel):
    # `pyvmm boot --flat hello.bin | sleep 1000`, then Ctrl-C: waiting for that reader ends at once.
    read_end, write_end, _ = full_pipe()
    try:
        process = pyvmm_boot(guest("hello"), accel, stdout=write_end, stderr=subprocess.PIPE)
        os.close(write_end)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=OUTPUT_GRACE_SECONDS + 2)
        process.send_signal(signal.SIGINT)
        assert finish(process) in (42, INTERRUPTED)
    finally:
        os.close(read_end)
