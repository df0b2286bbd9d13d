"""Exit-path overhead on KVM: microseconds per exit round trip, pyvmm beside a minimal C loop.

Two guests, each run at two loop counts N by pyvmm (`boot --flat`) and by
the C loop (bench/kvm_exit_loop.c): N `out`s to port 0x80 (port I/O), and N
4-byte stores to the scratch MMIO device at 0xD0000000 (MMIO). The
difference of the wall times divided by the difference in N is the cost of
one exit round trip, with start-up cancelled out. pyvmm and the C loop run
alternately and each figure is the median. Needs /dev/kvm, binutils and a
C compiler.
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

from bench.report import figure, interleaved, python_env, skipped  # noqa: E402

SMALL, LARGE = 10_000, 110_000
GUESTS = {"pio": "out_loop.S", "mmio": "mmio_loop.S"}


def assemble(source: str, count: int, workdir: Path) -> Path:
    obj, image = workdir / f"{source}_{count}.o", workdir / f"{source}_{count}.bin"
    subprocess.run(["as", "--32", f"--defsym=COUNT={count}", "-I", str(REPO / "tests/guest/asm"),
                    "-o", str(obj), str(HERE / source)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o", str(image), str(obj)],
                   check=True)
    return image


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=python_env(), timeout=300)
    return time.perf_counter() - start


def per_exit_us(make_command, small: Path, large: Path):
    """A measurement function: the cost of one exit, in microseconds, from one pair of runs."""
    return lambda: (wall_time(make_command(large)) - wall_time(make_command(small))) / (LARGE - SMALL) * 1e6


def main() -> None:
    missing = [tool for tool in ("as", "ld", "cc") if shutil.which(tool) is None]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or missing:
        reason = f"needs {', '.join(missing)} (apt-get install binutils gcc)" if missing else "/dev/kvm unusable"
        for kind in GUESTS:
            skipped(f"{kind} exit round trip (kvm)", reason)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        c_loop = workdir / "kvm_exit_loop"
        subprocess.run(["cc", "-O2", "-o", str(c_loop), str(HERE / "kvm_exit_loop.c")], check=True)
        for kind, source in GUESTS.items():
            small, large = assemble(source, SMALL, workdir), assemble(source, LARGE, workdir)
            pyvmm = per_exit_us(lambda image: [sys.executable, "-m", "vmm", "boot", "--accel", "kvm",
                                               "--flat", str(image)], small, large)
            c = per_exit_us(lambda image: [str(c_loop), str(image)], small, large)
            pyvmm()  # warm the bytecode caches
            ours, theirs = interleaved(pyvmm, c)
            figure(f"{kind} exit round trip (kvm)", "us/exit", ours, "C loop", theirs)


if __name__ == "__main__":
    main()
