"""Exit-path overhead on KVM: microseconds per exit round trip, pyvmm beside a minimal C loop.

Two guests, each run at two loop counts N by pyvmm (`boot --flat`) and by
the C loop (bench/kvm_exit_loop.c): N `out`s to port 0x80 (port I/O), and N
4-byte stores to the scratch MMIO device at 0xD0000000 (MMIO). Each is a
real exit to userspace and a device access in Python. The difference of the
wall times divided by the difference in N is the cost of one exit round
trip, with start-up cancelled out. pyvmm and the C loop run alternately and
each figure is the median. pyvmm is measured with the exit loop it uses
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

from bench.report import figure, interleaved, python_env, skipped  # noqa: E402
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


def wall_time(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env, timeout=300)
    return time.perf_counter() - start


def per_exit_us(make_command, small: Path, large: Path, **env: str):
    """A measurement function: the cost of one exit, in microseconds, from one pair of runs."""
    environment = {**python_env(), **env}
    return lambda: ((wall_time(make_command(large), environment) - wall_time(make_command(small), environment))
                    / (LARGE - SMALL) * 1e6)


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

            pyvmm = per_exit_us(pyvmm_command, small, large)
            python_loop = per_exit_us(pyvmm_command, small, large, **{LOOP_ENV: "python"})
            c = per_exit_us(lambda image: [str(c_loop), str(image)], small, large)
            pyvmm()  # warm the bytecode caches
            ours, theirs = interleaved(pyvmm, c)
            figure(f"{kind} exit round trip (kvm)", "us/exit", ours, "C loop", theirs, note=loop)
            ours, theirs = interleaved(python_loop, c)
            figure(f"{kind} exit round trip (kvm, Python exit loop)", "us/exit", ours, "C loop", theirs)


if __name__ == "__main__":
    main()
