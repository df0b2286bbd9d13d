"""Driving a booted guest's serial console from a test, like a person at a terminal.

`GuestSession` starts `pyvmm boot`, with stdin and stdout as pipes, and offers
`expect(text)` and `run(command)`; everything the guest printed is kept in
`output` for assertion messages. `converse_on_a_terminal` runs pyvmm on a
pseudo-terminal instead, for what pyvmm does only at a terminal.
"""

from __future__ import annotations

import os
import pty
import select
import selectors
import signal
import subprocess
import sys
import time

from tests.helpers import REPO, die_with_test_runner

PROMPT = b"pyvmm# "


class GuestSession:
    def __init__(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
                 program: list[str] | None = None) -> None:
        """`pyvmm boot ARGS...`, or `program` (a whole command line: the QEMU reference)."""
        self.timeout = timeout
        self.process = subprocess.Popen(
            program or [sys.executable, "-m", "vmm", "boot", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=REPO, start_new_session=True, preexec_fn=die_with_test_runner, env={**os.environ, **(env or {})})
        self.output = bytearray()  # appended to in place: a guest may print megabytes
        self._consumed = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)

    def expect(self, text: bytes | str, timeout: float | None = None) -> bytes:
        """Wait until `text` appears after what earlier expects consumed; return what came before it."""
        needle = text.encode() if isinstance(text, str) else text
        deadline = time.monotonic() + (timeout or self.timeout)
        searched = self._consumed  # where `needle` may start that has not been looked at
        while True:
            found = self.output.find(needle, searched)
            if found >= 0:
                before = bytes(self.output[self._consumed : found])
                self._consumed = found + len(needle)
                return before
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {needle!r}; guest said:\n"
                                     f"{self.output[-3000:].decode(errors='replace')}")
            if self._selector.select(timeout=min(remaining, 1.0)):
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"pyvmm exited ({self.process.wait()}) while waiting for {needle!r}; "
                                         f"stderr: {self.process.stderr.read().decode(errors='replace')}\n"
                                         f"guest said:\n{self.output[-3000:].decode(errors='replace')}")
                # Only the new bytes (and a needle's length before them) need looking at: a guest
                # printing much must not wait while the test searches its whole output again.
                searched = max(searched, len(self.output) - len(needle) + 1)
                self.output += chunk

    def send(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def run(self, command: str) -> str:
        """Run a shell command at the prompt; return what it printed (without the echo)."""
        self.send(command)
        self.expect(command.encode() + b"\r\n")  # the terminal echoes the line
        return self.expect(PROMPT).decode(errors="replace").replace("\r\n", "\n")

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for pyvmm to exit; its status and stderr."""
        status = self.process.wait(timeout=timeout)
        return status, self.process.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()


def converse_on_a_terminal(argv: list[str], replies: list[tuple[bytes, bytes]], *, timeout: float = 300,
                           env: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Run `argv` (from the repository) on a new pseudo-terminal, and type each reply's second part
    once the output so far holds its first part, in turn. Returns the exit status and all output
    (stdout and stderr: the terminal's). Killed if it has not ended after `timeout` seconds."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session leader on the pseudo-terminal
        os.chdir(REPO)
        os.environ.update(env or {})
        os.execv(argv[0], argv)
    output, replied, deadline = b"", 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([terminal], [], [], 1)[0]:
                try:
                    chunk = os.read(terminal, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            if replied < len(replies) and replies[replied][0] in output:
                os.write(terminal, replies[replied][1])
                replied += 1
        else:
            os.kill(pid, signal.SIGKILL)
        _, wait_status = os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    return os.waitstatus_to_exitcode(wait_status), output
