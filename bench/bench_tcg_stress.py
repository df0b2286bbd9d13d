"""Guest work in a fixed time on the software CPU, 1 and 2 vCPUs: pyvmm beside QEMU TCG.

Inside the Debian test guest (tests/boot/virtio_guest.py's initramfs), for
PYVMM_BENCH_STRESS_SECONDS (default 20) of the guest's own clock, run at once

    three shell loops, each: head -c 16384 /dev/urandom | sha256sum
    one disk loop:  dd 256 KiB O_DIRECT write with fsync, then an O_DIRECT
                    read of the same 256 KiB, on a virtio-blk disk

and count the iterations each kind finished. pyvmm runs with `--accel tcg
--cpus N`, QEMU 7.2 with `-accel tcg,thread=multi -M microvm -smp N` (its
multi-threaded TCG: one host thread per vCPU), the same kernel, initramfs,
command line and a raw disk image each. The counts are scaled to exactly the
window's length (the loops finish their last iteration past it).

The windows count work in wall time, which other processes' load moves
(QEMU's figure most: its I/O thread and vCPU thread compete for the cores).
So the same kind of work is also measured as CPU time: one vCPU boots,
hashes FIXED_HASHES times, runs FIXED_DISK_LOOPS disk iterations, and powers
off; the VMM's user + system time for all of it, pyvmm beside QEMU TCG,
median of the repeats.

Prints per vCPU count the hashing and the disk figures (higher is better),
and the 2-vCPU/1-vCPU scaling of each VMM. PYVMM_BENCH_STRESS_CPUS picks the
vCPU counts (default "1,2"). The guest's own window is the measurement, so
the boot's time does not count. On a shared host one window can catch a
burst of someone else's load: each case runs PYVMM_BENCH_STRESS_REPEATS
times (default 2), pyvmm and QEMU alternating, and the medians are kept.
PYVMM_BENCH_STRESS_FIXED_HASHES and PYVMM_BENCH_STRESS_FIXED_DISK_LOOPS
change the fixed job (defaults 500 and 80), for a quick run.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.qemu_peer import tsc_cmdline  # noqa: E402
from bench.report import children_cpu_seconds, figure, run_guest, skipped  # noqa: E402
from tests.assets import find_linux_assets  # noqa: E402
from tests.boot.virtio_guest import overlay_initrd, script_output  # noqa: E402

SECONDS = int(os.environ.get("PYVMM_BENCH_STRESS_SECONDS", "20"))
CPU_COUNTS = [int(n) for n in os.environ.get("PYVMM_BENCH_STRESS_CPUS", "1,2").split(",")]
REPEATS = int(os.environ.get("PYVMM_BENCH_STRESS_REPEATS", "2"))
HASH_LOOPS = 3
CMDLINE = "console=ttyS0 panic=-1 quiet"
MEMORY = "512M"
DISK_MB = 16
# Boot (up to a minute on a loaded host), the window, the power-off.
TIMEOUT = 300 + 2 * SECONDS

# The guest's clock decides the window. Each loop writes its count to a file;
# /proc/uptime's first field is seconds with two decimals.
SCRIPT = """
mkdir -p /tmp
now() {{ cut -d. -f1 /proc/uptime; }}
hash_loop() {{
    n=0
    while [ $(now) -lt $1 ]; do head -c 16384 /dev/urandom | sha256sum >/dev/null; n=$((n + 1)); done
    echo $n > /tmp/hash.$2
}}
disk_loop() {{
    n=0
    while [ $(now) -lt $1 ]; do
        dd if=/tmp/block of=/dev/vda bs=256k count=1 oflag=direct conv=fsync 2>/dev/null
        dd if=/dev/vda of=/dev/null bs=256k count=1 iflag=direct 2>/dev/null
        n=$((n + 1))
    done
    echo $n > /tmp/disk
}}
head -c 262144 /dev/urandom > /tmp/block
start=$(cut -d' ' -f1 /proc/uptime)
end=$(( ${{start%.*}} + {seconds} ))
for i in $(seq {hash_loops}); do hash_loop $end $i & done
disk_loop $end &
wait
stop=$(cut -d' ' -f1 /proc/uptime)
echo "stress hash $(cat /tmp/hash.* | awk '{{s += $1}} END {{print s}}') disk $(cat /tmp/disk) from $start to $stop"
"""


FIXED_HASHES = int(os.environ.get("PYVMM_BENCH_STRESS_FIXED_HASHES", "500"))
FIXED_DISK_LOOPS = int(os.environ.get("PYVMM_BENCH_STRESS_FIXED_DISK_LOOPS", "80"))
FIXED_JOB = f"""
mkdir -p /tmp
head -c 262144 /dev/urandom > /tmp/block
for i in $(seq {FIXED_HASHES}); do head -c 16384 /dev/urandom | sha256sum >/dev/null; done
for i in $(seq {FIXED_DISK_LOOPS}); do
    dd if=/tmp/block of=/dev/vda bs=256k count=1 oflag=direct conv=fsync 2>/dev/null
    dd if=/dev/vda of=/dev/null bs=256k count=1 iflag=direct 2>/dev/null
done
echo fixed job done
"""


def guest_counts(output: str) -> dict[str, float]:
    """Hashing and disk iterations per SECONDS of the guest's clock."""
    match = re.search(r"stress hash (\d+) disk (\d+) from ([\d.]+) to ([\d.]+)", output)
    if match is None:
        raise AssertionError(f"no stress line in the guest's output:\n{output[-2000:]}")
    hashes, disk, start, stop = int(match[1]), int(match[2]), float(match[3]), float(match[4])
    # The window ends at the first whole second SECONDS after `start`; the
    # loops' last iterations run past it, and `stop` says by how much.
    scale = SECONDS / max(stop - start, 0.01)
    return {"hash": hashes * scale, "disk": disk * scale}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {kind: statistics.median(run[kind] for run in runs) for kind in runs[0]}


def run(command: list[str]) -> dict[str, float]:
    return run_guest("bench_tcg_stress", command, lambda stdout: guest_counts(script_output(stdout)), timeout=TIMEOUT, cwd=REPO)


def cpu_seconds(command: list[str]) -> float:
    """User + system time of one run of the fixed job."""
    def finished(stdout: str) -> dict[str, float]:
        assert "fixed job done" in script_output(stdout), "the fixed job did not finish"
        return {}

    cpu = children_cpu_seconds()
    run_guest("bench_tcg_stress", command, finished, timeout=TIMEOUT, cwd=REPO)
    return children_cpu_seconds() - cpu


def pyvmm_command(assets, initrd: Path, disk: Path, cpus: int) -> list[str]:
    return [sys.executable, "-m", "vmm", "boot", "--accel", "tcg", "--cpus", str(cpus), "--kernel",
            str(assets.kernel), "--initrd", str(initrd), "--cmdline", CMDLINE, "--memory", MEMORY,
            "--disk", f"{disk},format=raw"]


def qemu_command(qemu: str, assets, initrd: Path, disk: Path, cpus: int) -> list[str]:
    return [qemu, "-accel", "tcg,thread=multi", "-M", "microvm,acpi=on,pit=on,rtc=on", "-smp", str(cpus),
            "-m", MEMORY, "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", str(assets.kernel), "-initrd", str(initrd), "-append", CMDLINE + tsc_cmdline("tcg"),
            "-drive", f"id=d0,file={disk},format=raw,if=none,cache=none", "-device", "virtio-blk-device,drive=d0"]


def main() -> None:
    assets = find_linux_assets()
    if assets is None:
        skipped("software-CPU stress", "Linux test assets are absent (run `make test-assets`)")
        return
    qemu = shutil.which("qemu-system-x86_64")
    missing = "" if qemu else "apt-get install qemu-system-x86"
    ours: dict[int, dict[str, float]] = {}
    theirs: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = SCRIPT.format(seconds=SECONDS, hash_loops=HASH_LOOPS)
        initrd = overlay_initrd(assets, script, workdir / "initrd.img")
        disk = workdir / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(DISK_MB << 20)
        for cpus in CPU_COUNTS:
            our_runs, their_runs = [], []
            for _ in range(REPEATS):
                our_runs.append(run(pyvmm_command(assets, initrd, disk, cpus)))
                if qemu:
                    their_runs.append(run(qemu_command(qemu, assets, initrd, disk, cpus)))
            ours[cpus] = medians(our_runs)
            if qemu:
                theirs[cpus] = medians(their_runs)
            for kind, what in (("hash", f"{HASH_LOOPS} sha256 loops"), ("disk", "256 KiB direct write+read loop")):
                figure(f"software CPU stress, {what}, {cpus} vCPU{'s' if cpus > 1 else ''}",
                       f"iterations/{SECONDS} s", ours[cpus][kind], "QEMU TCG microvm",
                       theirs[cpus][kind] if qemu else None, lower_is_better=False, missing=missing,
                       note=f"median of {REPEATS}")
        job_initrd = overlay_initrd(assets, FIXED_JOB, workdir / "job-initrd.img")
        our_cpu, their_cpu = [], []
        for _ in range(REPEATS):
            our_cpu.append(cpu_seconds(pyvmm_command(assets, job_initrd, disk, 1)))
            if qemu:
                their_cpu.append(cpu_seconds(qemu_command(qemu, assets, job_initrd, disk, 1)))
        figure(f"software CPU fixed job, 1 vCPU: boot, {FIXED_HASHES} hashes, {FIXED_DISK_LOOPS} disk loops, "
               "power-off", "s of CPU", statistics.median(our_cpu), "QEMU TCG microvm",
               statistics.median(their_cpu) if qemu else None, missing=missing,
               note=f"user + system time, median of {REPEATS}")
    if 1 in ours and len(ours) > 1:
        for cpus in CPU_COUNTS:
            if cpus == 1:
                continue
            for kind in ("hash", "disk"):
                peer = theirs[cpus][kind] / theirs[1][kind] if qemu and theirs[1][kind] else None
                figure(f"software CPU stress, {kind} work with {cpus} vCPUs over 1", "x",
                       ours[cpus][kind] / max(ours[1][kind], 1e-9), "QEMU TCG microvm", peer,
                       lower_is_better=False, missing=missing)


if __name__ == "__main__":
    main()
