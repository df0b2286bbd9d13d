"""A guest that never exits is still stopped promptly by a signal to pyvmm."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import termios
import time

import pytest

from tests.helpers import REPO, run_pyvmm


def signal_a_spinning_guest(guest, accel: str, *signals: signal.Signals, ignored=None) -> tuple[int, bytes]:
    """Boot the spinning guest (with `ignored` ignored from the start), send it `signals` in turn once
    it spins, and return pyvmm's status and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "vmm", "boot", "--flat", str(guest("spin")), "--accel", accel],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO,
        preexec_fn=None if ignored is None else lambda: signal.signal(ignored, signal.SIG_IGN),
    )
    try:
        assert process.stdout.readline() == b"spinning\n"
        for signum in signals:
            os.kill(process.pid, signum)
        status = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return status, process.stderr.read()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_a_spinning_guest(guest, accel, signum):
    status, stderr = signal_a_spinning_guest(guest, accel, signum)
    assert status == 130
    assert stderr.strip() == f"pyvmm: stopped by {signal.Signals(signum).name}".encode()


@pytest.mark.parametrize("ignored", [signal.SIGHUP, signal.SIGINT])
def test_a_signal_ignored_at_start_stays_ignored(guest, accel, ignored):
    """`nohup pyvmm boot ...` outlives its terminal (SIGHUP), and a script's background job
    outlives the Ctrl-C meant for its foreground (SIGINT): only SIGTERM stops the guest here."""
    status, stderr = signal_a_spinning_guest(guest, accel, ignored, signal.SIGTERM, ignored=ignored)
    assert status == 130
    assert stderr.strip() == b"pyvmm: stopped by SIGTERM"  # not by the ignored signal


def test_signal_stops_a_guest_blocked_on_console_output_nobody_reads(guest, accel):
    process = subprocess.Popen(
        [sys.executable, "-m", "vmm", "boot", "--flat", str(guest("flood")), "--accel", accel],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO,
    )
    try:
        assert process.stdout.readline() == b"flooding\n"
        # Stop reading: the pipe fills and the vCPU blocks writing to it.
        wait_until_pipe_is_full(process.stdout.fileno())
        os.kill(process.pid, signal.SIGTERM)
        status = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    assert status == 130
    assert stderr.strip() == b"pyvmm: stopped by SIGTERM"  # no vCPU left behind


def wait_until_pipe_is_full(fd: int) -> None:
    deadline = time.monotonic() + 20
    previous = -1
    while time.monotonic() < deadline:
        queued = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")
        if queued == previous and queued > 0:
            return
        previous = queued
        time.sleep(0.2)
    raise AssertionError("the guest's output never filled the pipe")


def test_timeout_stops_a_spinning_guest_with_status_124(guest, accel):
    result = run_pyvmm("boot", "--flat", str(guest("spin")), "--accel", accel, "--timeout", "1.5", timeout=60)
    assert result.returncode == 124
    assert result.stdout == b"spinning\n"
    assert result.stderr == b"pyvmm: the guest was still running after --timeout 1.5 s; stopped it\n"


def test_a_guest_that_ends_in_time_keeps_its_own_status(guest, accel):
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--accel", accel, "--timeout", "60", timeout=60)
    assert result.returncode == 42


def test_a_guest_exiting_with_124_itself_is_not_looked_at_as_timed_out(tmp_path, accel):
    # Its last `out` is followed by zero bytes, where a guest stopped by --timeout would be
    # reported stuck ("executing an all-zero page"); this one ended itself, with 124.
    image = tmp_path / "exit124.bin"
    image.write_bytes(b"\xb0\x7c" + b"\xe6\xf4")  # mov al, 124; out 0xf4, al
    result = run_pyvmm("boot", "--flat", str(image), "--accel", accel, timeout=60)
    assert (result.returncode, result.stderr) == (124, b"")


def test_a_vcpu_spinning_at_the_reset_vector_is_reported_once(guest, accel):
    # The guest needs microseconds to get there; whatever the timing, the
    # stuck vCPU is reported by the time --timeout stops it, and only once.
    result = run_pyvmm("boot", "--flat", str(guest("reset_vector_spin")), "--accel", accel, "--timeout", "3",
                       timeout=60)
    assert result.returncode == 124
    assert result.stderr.decode().splitlines() == [
        "pyvmm: vCPU 0 is spinning at the reset vector (RIP 0xffff0): the guest looks stuck",
        "pyvmm: the guest was still running after --timeout 3 s; stopped it",
    ]
