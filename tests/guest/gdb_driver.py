"""Driving pyvmm's gdb stub from a test: pyvmm held with -S, the real gdb in batch mode.

`DebuggedVm` starts `pyvmm boot ... --gdb tcp:127.0.0.1:0 -S` (a free port,
read back from the "waiting for a debugger" line, so parallel runs never
collide), keeps the guest's console as a `GuestSession`, and runs gdb
against it with `gdb_batch` (to completion) or `start_gdb` (in the
background, for a test that must act while gdb waits).
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.boot.session import GuestSession

STARTUP_TIMEOUT = 60.0
WAITING = re.compile(rb"pyvmm: gdb: waiting for a debugger on tcp:127\.0\.0\.1:(\d+)")


def require_gdb() -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed: apt-get install gdb")
    return gdb


class DebuggedVm:
    def __init__(self, *args: str, timeout: float = 120, subcommand: str = "boot") -> None:
        """`pyvmm SUBCOMMAND --gdb (any free port) -S ARGS...`: paused until a debugger continues it."""
        self.gdb = require_gdb()
        self.session = GuestSession(timeout=timeout, program=[
            sys.executable, "-m", "vmm", subcommand, "--gdb", "tcp:127.0.0.1:0", "-S", *args])
        self.stderr = b""
        self.port = self._read_port()

    def _read_port(self) -> int:
        stream = self.session.process.stderr
        selector = selectors.DefaultSelector()
        selector.register(stream, selectors.EVENT_READ)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while (match := WAITING.search(self.stderr)) is None:
            if time.monotonic() > deadline or not selector.select(timeout=deadline - time.monotonic()):
                self.close()
                raise AssertionError(f"pyvmm did not start listening for gdb; stderr: {self.stderr!r}")
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"pyvmm exited ({self.session.process.wait()}): {self.stderr!r}")
            self.stderr += chunk
        selector.close()
        return int(match.group(1))

    def _gdb_command(self, commands: list[str], elf=None) -> list[str]:
        argv = [self.gdb, "-nx", "-batch", "-ex", "set confirm off", "-ex", "set pagination off",
                "-ex", f"target remote 127.0.0.1:{self.port}"]
        for command in commands:
            argv += ["-ex", command]
        if elf is not None:
            argv.append(str(elf))
        return argv

    def gdb_batch(self, commands: list[str], elf=None, timeout: float = 120) -> str:
        """Run gdb with these commands to the end; its stdout and stderr, interleaved."""
        result = subprocess.run(self._gdb_command(commands, elf), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=timeout)
        return result.stdout.decode(errors="replace")

    def start_gdb(self, commands: list[str], elf=None) -> subprocess.Popen:
        return subprocess.Popen(self._gdb_command(commands, elf), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

    def wait(self, timeout: float = 120) -> int:
        """pyvmm's exit status, once the guest has finished."""
        return self.session.process.wait(timeout)

    def guest_output(self) -> str:
        """Everything the guest printed, after pyvmm ended."""
        self.wait()
        rest = self.session.process.stdout.read()
        return (self.session.output + rest).decode(errors="replace")

    def close(self) -> None:
        process = self.session.process
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
