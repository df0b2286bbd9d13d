"""make install's steps with their output gone: building an optional C module on a host that cannot
(vmm/compiled_module.py) and prebuilding cffi's declarations (vmm/cffi_prebuilt.py) never end in a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


def build_without_a_compiler(stderr) -> subprocess.CompletedProcess:
    """`make install`'s build of the serial port's module, with a C compiler that always fails."""
    return subprocess.run([sys.executable, "-m", "devices.uart_ports_build"], env={**os.environ, "CC": "/bin/false"},
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO, timeout=120)


@pytest.mark.parametrize("where", ["reader gone", "/dev/full"])
def test_a_stderr_that_cannot_take_the_notice_does_not_fail_the_build(where):
    # `make install 2>&1 | head` after head exited: print() raised BrokenPipeError (ENOSPC on /dev/full).
    if where == "/dev/full":
        with open("/dev/full", "wb") as full:
            result = build_without_a_compiler(full)
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = build_without_a_compiler(write_end)
        finally:
            os.close(write_end)
    assert (result.returncode, result.stdout) == (0, b"")


def test_prebuilding_the_declarations_with_output_gone_does_not_fail_the_install():
    # `make install 2>&1 | head`: cffi's "generating ..." line raised BrokenPipeError, status 1.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "vmm.cffi_prebuilt"], stdin=subprocess.DEVNULL,
                                stdout=write_end, stderr=write_end, cwd=REPO, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 0
