"""Exit-path overhead on KVM: microseconds per exit round trip, pyvmm beside a minimal C loop.

Two guests, each run at two loop counts N by pyvmm (`boot --flat`) and by
the C loop (bench/kvm_exit_loop.c): N `out`s to port 0x80 (port I/O), and N
4-byte stores to the scratch MMIO device at 0xD0000000 (MMIO). Each is a
real exit to userspace and a device access in Python. The difference of the
wall times divided by the difference in N is the cost of one exit round
trip, with start-up cancelled out. pyvmm and the C loop run alternately,
PYVMM_BENCH_REPEATS times, and each takes its fastest runs (the least
disturbed on a shared machine); each line also gives the CPU time per exit
(user + system), which the machine's load moves less. pyvmm is measured with the exit loop it uses
(the compiled one where it was built, vmm/kvm/exit_loop.py) and with the
Python loop (PYVMM_EXIT_LOOP=python). Needs /dev/kvm, binutils and a C
compiler.
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
from vmm.kvm.exit_loop import LOOP_ENV, compiled_loop_built  # noqa: E402

SMALL, LARGE = 10_000, 110_000
GUESTS = {"pio": "out_loop.S", "mmio": "mmio_loop.S"}


def assemble(source: str, count: int, workdir: Path) -> Path:
    obj, image = workdir / f"{source}_{count}.o", workdir / f"{source}_{count}.bin"
    subprocess.run(["as", "--32", f"--defsym=COUNT={count}", "-I", str(REPO / "tests/guest/asm"),
                    "-o", str(obj), str(HERE / source)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o", str(image), str(obj)],
                   check=True)
    return image


class Runs:
    """One VMM's runs of the small and the large guest, alternated with the other VMMs' runs."""

    def __init__(self, make_command, small: Path, large: Path, **env: str) -> None:
        self.commands = make_command(small), make_command(large)
        self.env = {**python_env(), **env}
        self.small: list[tuple[float, float]] = []  # (wall, CPU) seconds of each run
        self.large: list[tuple[float, float]] = []

    def run(self, command: list[str]) -> tuple[float, float]:
        cpu, start = children_cpu_seconds(), time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=self.env, timeout=300)
        return time.perf_counter() - start, children_cpu_seconds() - cpu

    def sample(self) -> None:
        self.small.append(self.run(self.commands[0]))
        self.large.append(self.run(self.commands[1]))

    def per_exit_us(self, which: int) -> float:
        """Microseconds per exit, of wall (0) or CPU (1) time: the fastest large run less the
        fastest small one (on a shared machine the fastest run is the one least disturbed)."""
        fastest = min(run[which] for run in self.large) - min(run[which] for run in self.small)
        return fastest / (LARGE - SMALL) * 1e6


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
        loop = "compiled exit loop" if compiled_loop_built() else "Python exit loop: the compiled one is not built"
        for kind, source in GUESTS.items():
            small, large = assemble(source, SMALL, workdir), assemble(source, LARGE, workdir)

            def pyvmm_command(image: Path) -> list[str]:
                return [sys.executable, "-m", "vmm", "boot", "--accel", "kvm", "--flat", str(image)]

            pyvmm = Runs(pyvmm_command, small, large)
            python_loop = Runs(pyvmm_command, small, large, **{LOOP_ENV: "python"})
            c = Runs(lambda image: [str(c_loop), str(image)], small, large)
            pyvmm.run(pyvmm.commands[0])  # warm the bytecode caches
            for _ in range(REPEATS):
                for runs in (pyvmm, python_loop, c):
                    runs.sample()
            for name, runs, detail in ((f"{kind} exit round trip (kvm)", pyvmm, loop),
                                       (f"{kind} exit round trip (kvm, Python exit loop)", python_loop, "")):
                cpu = (f"CPU time (user + system) per exit: pyvmm {runs.per_exit_us(1):.2f} us, "
                       f"C loop {c.per_exit_us(1):.2f} us")
                figure(name, "us/exit", runs.per_exit_us(0), "C loop", c.per_exit_us(0),
                       note="; ".join(filter(None, (detail, cpu))))


if __name__ == "__main__":
    main()
