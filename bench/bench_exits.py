"""Exit-path overhead: microseconds per port-I/O exit, pyvmm beside a minimal C loop.

Both run the same guest (N `out`s to port 0x80) at two values of N; the
difference of the wall times divided by the difference in N is the cost of
one exit round trip, with start-up cancelled out. Prints one line per figure
and the ratio. Needs /dev/kvm, binutils and a C compiler.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMALL, LARGE = 20_000, 220_000
REPEATS = 3


def assemble(count: int, workdir: Path) -> Path:
    obj, image = workdir / f"out_{count}.o", workdir / f"out_{count}.bin"
    subprocess.run(["as", "--32", f"--defsym=COUNT={count}", "-o", str(obj), str(HERE / "out_loop.S")],
                   check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o", str(image), str(obj)],
                   check=True)
    return image


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def per_exit_us(make_command, small: Path, large: Path) -> float:
    samples = []
    for _ in range(REPEATS):
        samples.append((wall_time(make_command(large)) - wall_time(make_command(small))) / (LARGE - SMALL))
    return statistics.median(samples) * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        small, large = assemble(SMALL, workdir), assemble(LARGE, workdir)
        c_loop = workdir / "kvm_exit_loop"
        subprocess.run(["cc", "-O2", "-o", str(c_loop), str(HERE / "kvm_exit_loop.c")], check=True)
        pyvmm = per_exit_us(lambda image: [sys.executable, "-m", "vmm", "boot", "--accel", "kvm",
                                           "--flat", str(image)], small, large)
        c = per_exit_us(lambda image: [str(c_loop), str(image)], small, large)
    print(f"pio exit round trip (kvm): pyvmm {pyvmm:.2f} us/exit, C loop {c:.2f} us/exit, "
          f"ratio {pyvmm / c:.2f}x")


if __name__ == "__main__":
    main()
