"""Interop tests against the reference tools: qemu-img and qemu-io (Debian: qemu-utils)."""

from __future__ import annotations

import shutil
import subprocess

import pytest


@pytest.fixture(scope="session")
def qemu():
    """A runner for qemu-img/qemu-io; skips when they are not installed."""
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: apt-get install qemu-utils")

    def run(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                              timeout=120, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    return run
