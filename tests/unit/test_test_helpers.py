"""The test helpers' own promises that a wrong answer would hide: no VM outlives its test runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.helpers import REPO

# A stand-in for a test runner: it starts a long child the way GuestSession starts
# pyvmm (a session of its own, tied to the runner) and tells us the child's pid.
RUNNER = """
import subprocess, sys
from tests.helpers import die_with_test_runner
child = subprocess.Popen(["sleep", "600"], start_new_session=True, preexec_fn=die_with_test_runner)
print(child.pid, flush=True)
sys.stdin.read()
"""


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its new parent to reap it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_in_its_own_session_dies_with_a_killed_runner():
    runner = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              cwd=REPO)
    child = int(runner.stdout.readline())
    try:
        assert alive(child)
        runner.kill()  # SIGKILL: the runner gets no chance to clean up
        runner.wait()
        deadline = time.monotonic() + 30
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the runner's child outlived it"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
        runner.stdin.close()
        runner.stdout.close()
