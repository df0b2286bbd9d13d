"""The serial console on a real terminal: raw mode while the guest runs, the
terminal restored on every way out, Ctrl-A x to quit."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import termios

import pytest

from tests.helpers import REPO, die_with_test_runner, read_until


@pytest.fixture
def terminal():
    """A pty pair: pyvmm gets the slave as its terminal, the test holds the master."""
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    yield master, slave, before
    os.close(master)
    os.close(slave)


def start_on_terminal(slave: int, image, accel: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmm", "boot", "--flat", str(image), "--accel", accel],
                            stdin=slave, stdout=slave, stderr=slave, cwd=REPO, start_new_session=True, preexec_fn=die_with_test_runner)


def test_ctrl_a_x_quits_and_restores_the_terminal(guest, accel, terminal):
    master, slave, before = terminal
    process = start_on_terminal(slave, guest("spin"), accel)
    try:
        read_until(master, b"spinning")
        raw = termios.tcgetattr(slave)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO  # raw while the guest runs
        os.write(master, b"\x01x")
        assert process.wait(timeout=30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert read_until(master, b"Ctrl-A x").count(b"pyvmm: stopped by Ctrl-A x") == 1
    assert termios.tcgetattr(slave) == before


def test_sigterm_restores_the_terminal(guest, accel, terminal):
    master, slave, before = terminal
    process = start_on_terminal(slave, guest("spin"), accel)
    try:
        read_until(master, b"spinning")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert termios.tcgetattr(slave) == before
