"""The README's first command, `make demo`, as a new user runs it (after `make install`)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO


def test_make_demo_boots_the_hello_guest():
    if not (REPO / ".venv" / ".installed").exists():
        pytest.skip("no .venv: run `make install` (make test does) first")
    if reason := (None if os.access("/dev/kvm", os.R_OK | os.W_OK) else "/dev/kvm is not usable"):
        pytest.skip(reason)
    if shutil.which("make") is None:
        pytest.skip("make is not installed: apt-get install make")
    result = subprocess.run(["make", "-s", "demo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Hello from real mode" in result.stdout
    assert "guest exited with status 42" in result.stdout


def test_the_demo_guest_built_in_python_is_hello_s_as_gnu_as_assembles_it(guest):
    from tests.guest.hello_image import hello_image

    assert hello_image() == guest("hello").read_bytes()
