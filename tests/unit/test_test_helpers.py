"""The test helpers' own promises that a wrong answer would hide: no VM outlives its test runner, and a
hung L1 is found without waiting out its timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.helpers import REPO
from tests.nested.l1_run import SILENT_SECONDS, wait_for_l1

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


def test_an_l1_silent_for_five_heartbeats_is_taken_for_hung_before_its_timeout():
    # A 5 s timeout: were silence not noticed, the answer would be the timeout.
    with subprocess.Popen(["sleep", "600"]) as qemu:
        try:
            started = time.monotonic()
            hang = wait_for_l1(qemu, started, 5, last_line=lambda: started - SILENT_SECONDS)
        finally:
            qemu.kill()
    assert hang is not None and hang.startswith("silent for")


def test_an_l1_that_keeps_talking_runs_until_its_timeout():
    with subprocess.Popen(["sleep", "600"]) as qemu:
        try:
            hang = wait_for_l1(qemu, time.monotonic() - 3600, 3600, last_line=time.monotonic)
        finally:
            qemu.kill()
    assert hang == "timed out after 3600 s"


def test_an_l1_that_ends_is_not_hung():
    with subprocess.Popen(["true"]) as qemu:
        assert wait_for_l1(qemu, time.monotonic(), 3600, last_line=time.monotonic) is None
