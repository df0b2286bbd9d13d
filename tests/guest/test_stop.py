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

from tests.helpers import REPO


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_a_spinning_guest(guest, accel, signum):
    process = subprocess.Popen(
        [sys.executable, "-m", "vmm", "boot", "--flat", str(guest("spin")), "--accel", accel],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO,
    )
    try:
        assert process.stdout.readline() == b"spinning\n"
        os.kill(process.pid, signum)
        status = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    assert status == 130
    assert stderr.strip() == f"pyvmm: stopped by {signal.Signals(signum).name}".encode()


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
