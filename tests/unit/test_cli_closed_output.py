"""Every pyvmm command ends as `pyvmm boot` does when its output has nowhere to go.

`pyvmm check | head -1` or `pyvmm img info X | head -1` after head exited, or
`... >&-`: status 141 and one line on stderr; stdout on a full disk (/dev/full):
status 1 (compare's error status, 2, for compare) and one line; never a
traceback, and never a new image left half written, nor by a convert that
SIGHUP (its terminal closed) or SIGTERM stops. Each runs the real CLI in a
child process (tests/guest/test_closed_output.py has `pyvmm boot`'s).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest

from tests.helpers import REPO
from vmm.exit_status import INTERRUPTED, OUTPUT_CLOSED

BROKEN_PIPE = b"pyvmm: stdout was closed (Broken pipe)\n"
FULL = b"pyvmm: cannot write to stdout: No space left on device\n"


def pyvmm(*args, stdout, stderr=subprocess.PIPE, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm", *map(str, args)], stdin=subprocess.DEVNULL,
                          stdout=stdout, stderr=stderr, cwd=REPO, timeout=60, **popen)


@contextlib.contextmanager
def reader_gone() -> Iterator[int]:
    """The write end of a pipe whose reader has exited (`| head` after head's last line)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        yield write_end
    finally:
        os.close(write_end)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.qcow2"
    subprocess.run([sys.executable, "-m", "vmm", "img", "create", "-q", "-f", "qcow2", str(path), "64M"],
                   check=True, cwd=REPO)
    return path


COMMANDS = {
    "check": ["check"],
    "img info": ["img", "info", "{image}"],
    "img info json": ["img", "info", "--output", "json", "{image}"],
    "img check": ["img", "check", "{image}"],
    "img compare": ["img", "compare", "{image}", "{image}"],
    "img resize": ["img", "resize", "{image}", "+1M"],
    "--help": ["--help"],
    "--version": ["--version"],
    "img --help": ["img", "--help"],
}


def command(name: str, image) -> list[str]:
    return [word.format(image=image) for word in COMMANDS[name]]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_command_whose_reader_exited_ends_with_141_and_one_line(image, name):
    with reader_gone() as stdout:
        result = pyvmm(*command(name, image), stdout=stdout)
    assert (result.returncode, result.stderr) == (OUTPUT_CLOSED, BROKEN_PIPE)


@pytest.mark.parametrize("name", ["check", "img info", "--help"])
def test_a_stdout_closed_at_start_ends_it_the_same_way(image, name):
    # `pyvmm img info X >&-`: click found no stdout and printed nothing, with status 0.
    result = pyvmm(*command(name, image), stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(1))
    assert (result.returncode, result.stderr) == (OUTPUT_CLOSED, b"pyvmm: stdout was closed (Bad file descriptor)\n")


@pytest.mark.parametrize("name, status", [("check", 1), ("img info", 1), ("--help", 1), ("img compare", 2)])
def test_a_full_stdout_is_an_error_of_one_line(image, name, status):
    # `pyvmm check` and `--help` ended in a traceback.
    with open("/dev/full", "wb") as full:
        result = pyvmm(*command(name, image), stdout=full)
    assert (result.returncode, result.stderr) == (status, FULL)


def test_stderr_on_the_same_closed_pipe_ends_it_the_same_way(image):
    # `pyvmm img info X 2>&1 | head`: the line saying why has nowhere to go either.
    with reader_gone() as output:
        result = pyvmm("img", "info", image, stdout=output, stderr=output)
    assert result.returncode == OUTPUT_CLOSED


def test_a_usage_error_keeps_its_status_when_stderr_cannot_be_written():
    # Click's message about the command line went to a full stderr: a traceback, status 1.
    with open("/dev/full", "wb") as full:
        result = pyvmm("boot", "--no-such-option", stdout=subprocess.PIPE, stderr=full)
    assert (result.returncode, result.stdout) == (2, b"")


def test_create_whose_reader_exited_leaves_no_image(tmp_path):
    # The "Formatting ..." line came after the image was in place: status 1 and a new image.
    target = tmp_path / "new.qcow2"
    with reader_gone() as stdout:
        result = pyvmm("img", "create", "-f", "qcow2", target, "64M", stdout=stdout)
    assert (result.returncode, result.stderr) == (OUTPUT_CLOSED, BROKEN_PIPE)
    assert list(tmp_path.iterdir()) == []


def signals_as(ignored: tuple[signal.Signals, ...] = ()) -> None:
    """In the child: SIGHUP, SIGTERM and SIGINT at their defaults, whatever the test runner inherited
    (`nohup`, or `&` in a script, ignores some), but for those `ignored`."""
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)


@contextlib.contextmanager
def convert_held_half_way(tmp_path, ignored: tuple[signal.Signals, ...] = ()
                          ) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """`pyvmm img convert` showing its progress bar on a terminal whose output is stopped (Ctrl-S)
    half way, its new image half written beside the source: (the process, the terminal's controller
    and the terminal). It starts with the signals `ignored` ignored."""
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(32 << 20))  # compressed below: long enough to be caught half way
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "vmm", "img", "convert", "-c", "-O", "qcow2", str(source), str(tmp_path / "out")],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.PIPE, cwd=REPO,
        preexec_fn=lambda: signals_as(ignored))
    try:
        # Each wait has a deadline, so that a convert that ends too soon fails the test
        # instead of hanging it.
        deadline = time.monotonic() + 60
        seen = b""
        while b"Converting" not in seen:  # the bar's first line, before the new image
            assert select.select([controller], [], [], max(deadline - time.monotonic(), 0))[0], seen
            seen += os.read(controller, 4096)
        termios.tcflow(terminal, termios.TCOOFF)  # its next line waits...
        while not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no half-written image in 60 s"
            time.sleep(0.01)
        # ...with the new image half written.
        yield process, controller, terminal
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
        os.close(terminal)
        with contextlib.suppress(OSError):
            os.close(controller)


def test_convert_whose_terminal_went_away_leaves_no_partial_image(tmp_path):
    # The terminal is closed: the bar's next line fails with EIO, and the half-written image must
    # not stay (it did not before either; the status was 1 and the line "pyvmm: Input/output error").
    with convert_held_half_way(tmp_path) as (process, controller, _):
        os.close(controller)
        assert process.wait(timeout=60) == OUTPUT_CLOSED
        assert process.stderr.read() == b"pyvmm: stdout was closed (Input/output error)\n"
    assert [p.name for p in tmp_path.iterdir()] == ["source.raw"]


@pytest.mark.parametrize("sig, line", [(signal.SIGHUP, b"pyvmm: stopped by SIGHUP\n"),
                                       (signal.SIGTERM, b"pyvmm: stopped by SIGTERM\n"),
                                       (signal.SIGINT, b"pyvmm: interrupted\n")])
def test_convert_stopped_by_a_signal_leaves_no_partial_image(tmp_path, sig, line):
    # Closing the terminal that runs it sends SIGHUP: pyvmm died of it (and of SIGTERM) and left
    # the hidden, half-written .out.*.tmp beside the source. Ctrl-C already removed it.
    with convert_held_half_way(tmp_path) as (process, _, terminal):
        process.send_signal(sig)
        termios.tcflow(terminal, termios.TCOON)  # the bar's last line, on the way out
        assert process.wait(timeout=60) == INTERRUPTED
        assert process.stderr.read() == line
    assert [p.name for p in tmp_path.iterdir()] == ["source.raw"]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_signal_ignored_at_start_stays_ignored(tmp_path, sig):
    # `nohup pyvmm img convert ...`: the terminal closing must not stop it. pyvmm's handler
    # replaced nohup's SIG_IGN, and the convert ended with status 130 and no image.
    with convert_held_half_way(tmp_path, ignored=(sig,)) as (process, _, terminal):
        process.send_signal(sig)
        termios.tcflow(terminal, termios.TCOON)
        assert process.wait(timeout=60) == 0, process.stderr.read()
        assert process.stderr.read() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source.raw"]
