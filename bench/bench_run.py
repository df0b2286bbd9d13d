"""`pyvmm run`: the whole round trip, and file-heavy work through virtio-fs.

1. `pyvmm run -- true`, process start to exit, beside QEMU (microvm, same
   accelerator and kernel) booting the test busybox initramfs whose /init
   runs `true` and powers off: the smallest job either can do.
2. Inside one `pyvmm run`: `find` and `git status` over this checkout (read
   through the read-only root share) and a 256 MiB sequential write and read
   with dd through a --rw share, each timed in the guest, beside the same
   commands on the host.

Prints each figure with pyvmm's time over the peer's (below 1: pyvmm took less).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.qemu_peer import tsc_cmdline  # noqa: E402
from boot.cpio import CpioWriter  # noqa: E402
from tests.assets import fetch_module_tree, find_linux_assets, find_module_tree  # noqa: E402
from vmm.kvm import quirks  # noqa: E402

REPEATS = int(os.environ.get("PYVMM_BENCH_REPEATS", "3"))
TIMEOUT = 600
MiB = 1 << 20

# Each line: a name, then a command run with `sh -c` (in the guest and on the host)
# whose last line of output is the seconds it took.
WORKLOADS = {
    "find over the checkout": 'find "$REPO" | wc -l >/dev/null',
    "git status over the checkout": 'git -C "$REPO" status --porcelain >/dev/null 2>&1',
    "256 MiB sequential write (dd)": 'dd if=/dev/zero of="$SCRATCH/big" bs=1M count=256 conv=fsync 2>/dev/null',
    "256 MiB sequential read (dd)": 'dd if="$SCRATCH/big" of=/dev/null bs=1M 2>/dev/null',
}


def timed(script: str) -> str:
    """`script` followed by the seconds it took, measured where it runs."""
    return f'start=$(date +%s%N); {script}; end=$(date +%s%N); echo "$((end - start))"'


def wall_time(command: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, timeout=TIMEOUT, capture_output=True, **kwargs)
    return time.perf_counter() - start


def qemu_true_initrd(assets, scratch: Path) -> Path:
    overlay = CpioWriter()
    overlay.file("init", b"#!/bin/sh\n/bin/busybox true\n/bin/busybox poweroff -f\n", 0o755)
    base = assets.initrd.read_bytes()
    path = scratch / "true.cpio"
    path.write_bytes(base + bytes(-len(base) % 4) + overlay.finish())
    return path


def main() -> None:
    assets = find_linux_assets()
    if assets is None:
        sys.exit("bench_run: no test kernel; run `make test-assets` first")
    modules = find_module_tree(assets) or fetch_module_tree(assets)
    accel = "kvm" if os.path.exists("/dev/kvm") and quirks.can_run_linux()[0] else "tcg"
    run = [sys.executable, "-m", "vmm", "run", "--accel", accel, "--kernel", str(assets.kernel),
           "--modules", str(modules)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Not under /tmp: the guest has a tmpfs of its own there.
    (REPO / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-run-", dir=REPO / "build") as name:
        scratch = Path(name)
        pyvmm_true = statistics.median(wall_time([*run, "--", "true"], env=env, stdin=subprocess.DEVNULL)
                                       for _ in range(REPEATS))
        qemu = shutil.which("qemu-system-x86_64")
        peer = None
        if qemu:
            initrd = qemu_true_initrd(assets, scratch)
            cpu = ["-cpu", "host"] if accel == "kvm" else []
            peer = statistics.median(wall_time(
                [qemu, "-M", "microvm,acpi=on,pit=on,rtc=on", "-accel", accel, *cpu, "-m", "512M",
                 "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
                 "-kernel", str(assets.kernel), "-initrd", str(initrd),
                 "-append", "console=ttyS0 panic=-1 quiet" + tsc_cmdline(accel)]) for _ in range(REPEATS))
        print(f"pyvmm run -- true ({accel}, {assets.kernel.name}, median of {REPEATS}):")
        print(f"  pyvmm run: {pyvmm_true:.2f} s" + (f", ratio {pyvmm_true / peer:.2f}x QEMU" if peer else ""))
        print(f"  QEMU microvm, initramfs running true: {peer:.2f} s" if peer else
              "  QEMU: not installed (apt-get install qemu-system-x86)")

        work = {"REPO": str(REPO), "SCRATCH": str(scratch)}
        script = "; ".join(timed(command) for command in WORKLOADS.values())
        guest = subprocess.run([*run, "--rw", str(scratch), *(f"--env={k}={v}" for k, v in work.items()),
                                "--", "sh", "-c", script], env=env, capture_output=True, timeout=TIMEOUT,
                               stdin=subprocess.DEVNULL, check=True)
        (scratch / "big").unlink()
        host = subprocess.run(["sh", "-c", script], env={**os.environ, **work}, capture_output=True,
                              timeout=TIMEOUT, check=True)
        guest_ns = [int(n) for n in re.findall(rb"^\d+$", guest.stdout, re.MULTILINE)]
        host_ns = [int(n) for n in re.findall(rb"^\d+$", host.stdout, re.MULTILINE)]
        print("file work through virtio-fs, timed inside the guest, beside the host:")
        for name, in_guest, on_host in zip(WORKLOADS, guest_ns, host_ns, strict=True):
            rate = ""
            if "256 MiB" in name:
                rate = f" ({256 * MiB / (in_guest / 1e9) / 1e6:.0f} MB/s vs {256 * MiB / (on_host / 1e9) / 1e6:.0f} MB/s)"
            print(f"  {name}: pyvmm {in_guest / 1e9:.3f} s, host {on_host / 1e9:.3f} s, "
                  f"ratio {in_guest / on_host:.1f}x{rate}")


if __name__ == "__main__":
    main()
