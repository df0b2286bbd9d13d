"""Start-up: from spawning the VMM to the guest's first instruction, and to its exit.

The guest (bench/first_insn.S) prints one byte on COM1 as its first
instruction and then exits through port 0xf4. The first figure is the time
from spawning the VMM to that byte arriving on the VMM's stdout; the
second, to the VMM process ending. pyvmm runs it with `boot --flat`; QEMU
(microvm, 512 MiB like pyvmm's default, isa-debug-exit on 0xf4) runs the
same instructions from a 64 KiB firmware image whose last 16 bytes, at the
reset vector, hold them. Each accelerator this host has is measured; pyvmm
and QEMU alternate, PYVMM_BENCH_REPEATS times (default 5), and each figure
is a median. The second line also gives
each process's CPU time (user + system), which the machine's load moves
less than the wall time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.report import REPEATS, children_cpu_seconds, figure, python_env, skipped  # noqa: E402

TIMEOUT = 60
PYVMM_STATUS, QEMU_STATUS = 0x10, (0x10 << 1) | 1  # isa-debug-exit exits with (value << 1) | 1


def build_guest(workdir: Path) -> tuple[Path, Path]:
    """(the flat image for pyvmm, the same code as a firmware image for QEMU)."""
    obj, flat = workdir / "first_insn.o", workdir / "first_insn.bin"
    subprocess.run(["as", "--32", "-o", str(obj), str(HERE / "first_insn.S")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o", str(flat), str(obj)],
                   check=True)
    code = flat.read_bytes()
    firmware = bytearray(b"\xf4" * 0x10000)  # hlt everywhere else
    firmware[0xFFF0 : 0xFFF0 + len(code)] = code
    bios = workdir / "first_insn.rom"
    bios.write_bytes(firmware)
    return flat, bios


def timed_run(command: list[str], status: int) -> tuple[float, float, float]:
    """(seconds to the guest's first byte on stdout, seconds to the process's end, the process's
    CPU seconds, user + system)."""
    start = time.perf_counter()
    cpu = children_cpu_seconds()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env=python_env())
    try:
        first = process.stdout.read(1)
        first_byte = time.perf_counter() - start
        process.stdout.read()
        process.wait(timeout=TIMEOUT)
        ended = time.perf_counter() - start
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    cpu = children_cpu_seconds() - cpu
    if first != b"!" or process.returncode != status:
        raise SystemExit(f"bench_start: {command[0]} printed {first!r} and exited {process.returncode}")
    return first_byte, ended, cpu


def accelerators() -> list[str]:
    return (["kvm"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else []) + ["tcg"]


def main() -> None:
    if shutil.which("as") is None or shutil.which("ld") is None:
        skipped("start to first guest instruction", "needs binutils (apt-get install binutils)")
        return
    qemu = shutil.which("qemu-system-x86_64")
    with tempfile.TemporaryDirectory() as tmp:
        flat, bios = build_guest(Path(tmp))
        for accel in accelerators():
            pyvmm = [sys.executable, "-m", "vmm", "boot", "--accel", accel, "--flat", str(flat)]
            peer = [qemu, "-M", "microvm", "-accel", accel, "-m", "512M", "-bios", str(bios), "-nodefaults",
                    "-no-user-config", "-nographic", "-serial", "stdio",
                    "-device", "isa-debug-exit,iobase=0xf4,iosize=1"] if qemu else None
            timed_run(pyvmm, PYVMM_STATUS)  # warm the bytecode caches and the page cache
            ours, theirs = [], []
            for _ in range(REPEATS):
                ours.append(timed_run(pyvmm, PYVMM_STATUS))
                if peer:
                    theirs.append(timed_run(peer, QEMU_STATUS))
            def median(samples: list[tuple[float, ...]], index: int) -> float | None:
                return sorted(sample[index] for sample in samples)[len(samples) // 2] if samples else None

            cpu = f"CPU time (user + system): pyvmm {median(ours, 2):.3f} s"
            if theirs:
                cpu += f", QEMU {median(theirs, 2):.3f} s"
            for index, what in enumerate(("start to first guest instruction", "flat guest start to exit")):
                figure(f"{what} ({accel})", "s", median(ours, index), "QEMU microvm", median(theirs, index),
                       missing="" if qemu else "apt-get install qemu-system-x86", note=cpu if index else "")


if __name__ == "__main__":
    main()
