"""A guest that never exits is still stopped promptly by a signal to pyvmm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
