"""Driving pyvmm's gdb stub from a test: pyvmm held with -S, the real gdb in batch mode.

`DebuggedVm` starts `pyvmm boot ... --gdb tcp:127.0.0.1:0 -S` (a free port,
read back from the "waiting for a debugger" line, so parallel runs never
collide; or `--gdb unix:PATH`), keeps the guest's console as a
`GuestSession`, and runs gdb against it with `gdb_batch` (to completion) or
`start_gdb` (in the background, for a test that must act while gdb waits).
`gdb_command` is that gdb's command line, for any target.
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
WAITING = re.compile(rb"pyvmm: gdb: waiting for a debugger on (?:tcp:127\.0\.0\.1:(\d+)|unix:(\S+))")


def require_gdb() -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed: apt-get install gdb")
    return gdb


def gdb_command(target: str, commands: list[str], elf=None) -> list[str]:
    """gdb in batch mode: connect to `target` (HOST:PORT, or a unix socket's path), run `commands`."""
    argv = [require_gdb(), "-nx", "-batch", "-ex", "set confirm off", "-ex", "set pagination off",
            "-ex", f"target remote {target}"]
    for command in commands:
        argv += ["-ex", command]
    if elf is not None:
        argv.append(str(elf))
    return argv


class DebuggedVm:
    def __init__(self, *args: str, timeout: float = 120, subcommand: str = "boot",
                 listen: str = "tcp:127.0.0.1:0") -> None:
        """`pyvmm SUBCOMMAND --gdb LISTEN -S ARGS...`: paused until a debugger continues it."""
        require_gdb()  # skips the test before pyvmm starts
        self.session = GuestSession(timeout=timeout, program=[
            sys.executable, "-m", "vmm", subcommand, "--gdb", listen, "-S", *args])
        self.stderr = b""
        waiting = self._read_waiting()
        self.port = int(waiting.group(1)) if waiting.group(1) else None
        self.target = f"127.0.0.1:{self.port}" if self.port else waiting.group(2).decode()  # for target remote

    def _read_waiting(self) -> re.Match:
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
        return match

    def _gdb_command(self, commands: list[str], elf=None) -> list[str]:
        return gdb_command(self.target, commands, elf)

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
