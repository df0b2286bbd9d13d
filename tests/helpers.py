"""Shared test helpers: running the pyvmm CLI, assembling guests, host facts."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST_ASM = REPO / "tests" / "guest" / "asm"


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Looked up here, not in the forked child, where the dynamic loader's lock may be held.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_test_runner() -> None:
    """A `preexec_fn`: the child is killed when the test runner dies, however it dies.

    VMs and L1s run in sessions of their own (a Ctrl-C at the terminal reaches only
    the runner, which then stops them in order), so a runner killed from outside, by
    SIGKILL or a CI timeout, would otherwise leave them running. The signal follows
    the thread that started the child: start it from a thread that outlives it.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_pyvmm(*args: str, input: bytes | None = None, timeout: float = 120,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `pyvmm ARGS` as a user would, in a child process; stdout/stderr captured as bytes."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vmm", *args], input=input, capture_output=True, timeout=timeout,
        env=full_env, cwd=REPO, stdin=None if input is not None else subprocess.DEVNULL,
    )


def kvm_usable() -> str | None:
    """None when /dev/kvm can be opened, else the reason it cannot."""
    path = os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm")
    if not os.path.exists(path):
        return f"{path} is missing (no KVM on this host)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"no permission on {path} (run as root or join the kvm group)"
    return None


def host_is_qemu_tcg() -> bool:
    """True on a machine whose CPU is QEMU's software CPU (the nested tier's L1)."""
    try:
        return "QEMU TCG CPU" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def assemble(source: Path, output_dir: Path, *, bits: int = 32, link_address: int = 0) -> Path:
    """Assemble a flat guest with GNU as into a raw binary linked at `link_address`.

    The source picks its own .code16/.code32/.code64; `bits` is the object format.
    """
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU binutils (as, ld) is not installed: apt-get install binutils")
    obj = output_dir / (source.stem + ".o")
    image = output_dir / (source.stem + ".bin")
    emulation = "elf_i386" if bits == 32 else "elf_x86_64"
    subprocess.run(["as", f"--{bits}", "-I", str(source.parent), "-o", str(obj), str(source)],
                   check=True, capture_output=True)
    subprocess.run(["ld", "-m", emulation, f"-Ttext={link_address:#x}", "--oformat", "binary",
                    "-o", str(image), str(obj)], check=True, capture_output=True)
    return image

if __name__ == "__main__":
    # `python -m tests.helpers OUTPUT_DIR SOURCE.S`: assemble a flat guest the way
    # the tests do (make demo uses it), and print the image's path.
    import sys

    output_dir = Path(sys.argv[1])
    output_dir.mkdir(parents=True, exist_ok=True)
    print(assemble(Path(sys.argv[2]), output_dir))


def full_pipe() -> tuple[int, int, int]:
    """A pipe already full, as if its reader had stopped reading: (read end, write end, the bytes in it)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    earlier = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            earlier += os.write(write_fd, bytes(4096))
    os.set_blocking(write_fd, True)
    return read_fd, write_fd, earlier


def read_until(fd: int, marker: bytes, timeout: float = 30.0) -> bytes:
    """Read `fd` (a terminal's controller, a pipe) until what was read holds `marker`; all of it."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {marker!r}; got {seen!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen
