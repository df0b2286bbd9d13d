"""`pyvmm run`: the whole round trip, and file-heavy work through virtio-fs.

1. `pyvmm run -- true`, process start to exit, beside QEMU (microvm, same
   accelerator and kernel) booting the test busybox initramfs whose /init
   runs `true` and powers off: the smallest job either can do.
2. Inside one `pyvmm run`: `find` and `git status` over this checkout (read
   through the read-only root share) and a 256 MiB sequential write and read
   with dd through a --rw share, each timed in the guest, beside the same
   commands on the host.

Prints each figure with pyvmm's time over the peer's (below 1: pyvmm took less).
The `true` round trip is the median of PYVMM_BENCH_REPEATS runs each (default
5); PYVMM_BENCH_RUN_MB changes the dd size (default 256), for a quick run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.qemu_peer import tsc_cmdline  # noqa: E402
from bench.report import figure, interleaved, python_env  # noqa: E402
from boot.cpio import CpioWriter  # noqa: E402
from tests.assets import fetch_module_tree, find_linux_assets, find_module_tree  # noqa: E402
from vmm.kvm import quirks  # noqa: E402

TIMEOUT = 600
MiB = 1 << 20
DD_MB = int(os.environ.get("PYVMM_BENCH_RUN_MB", "256"))

# Each workload: a command run with `sh -c`, in the guest and on the host, timed where it runs.
WORKLOADS = {
    "find over the checkout": 'find "$REPO" | wc -l >/dev/null',
    "git status over the checkout": 'git -C "$REPO" status --porcelain >/dev/null 2>&1',
    f"{DD_MB} MiB sequential write (dd)":
        f'dd if=/dev/zero of="$SCRATCH/big" bs=1M count={DD_MB} conv=fsync 2>/dev/null',
    f"{DD_MB} MiB sequential read (dd)": 'dd if="$SCRATCH/big" of=/dev/null bs=1M 2>/dev/null',
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
    env = python_env()
    # Not under /tmp: the guest has a tmpfs of its own there.
    (REPO / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-run-", dir=REPO / "build") as name:
        scratch = Path(name)
        qemu = shutil.which("qemu-system-x86_64")
        qemu_run = None
        if qemu:
            initrd = qemu_true_initrd(assets, scratch)
            cpu = ["-cpu", "host"] if accel == "kvm" else []
            qemu_command = [qemu, "-M", "microvm,acpi=on,pit=on,rtc=on", "-accel", accel, *cpu, "-m", "512M",
                            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
                            "-kernel", str(assets.kernel), "-initrd", str(initrd),
                            "-append", "console=ttyS0 panic=-1 quiet" + tsc_cmdline(accel)]

            def qemu_run() -> float:
                return wall_time(qemu_command)

        ours, theirs = interleaved(lambda: wall_time([*run, "--", "true"], env=env, stdin=subprocess.DEVNULL),
                                   qemu_run)
        figure(f"pyvmm run -- true, start to exit ({accel})", "s", ours,
               "QEMU microvm booting an initramfs that runs true", theirs,
               missing="" if qemu else "apt-get install qemu-system-x86")

        work = {"REPO": str(REPO), "SCRATCH": str(scratch)}
        script = "; ".join(timed(command) for command in WORKLOADS.values())
        guest = subprocess.run([*run, "--rw", str(scratch), *(f"--env={k}={v}" for k, v in work.items()),
                                "--", "sh", "-c", script], env=env, capture_output=True, timeout=TIMEOUT,
                               stdin=subprocess.DEVNULL, check=True)
        (scratch / "big").unlink()
        host = subprocess.run(["sh", "-c", script], env={**os.environ, **work}, capture_output=True,
                              timeout=TIMEOUT, check=True)
        guest_ns = [int(n) for n in guest.stdout.split()]
        host_ns = [int(n) for n in host.stdout.split()]
        for name, in_guest, on_host in zip(WORKLOADS, guest_ns, host_ns, strict=True):
            if "(dd)" in name:
                figure(f"virtio-fs {name}, in the guest ({accel})", "MB/s", DD_MB * MiB / in_guest * 1e3,
                       "the host", DD_MB * MiB / on_host * 1e3, lower_is_better=False)
            else:
                figure(f"virtio-fs {name}, in the guest ({accel})", "s", in_guest / 1e9, "the host", on_host / 1e9)


if __name__ == "__main__":
    main()
