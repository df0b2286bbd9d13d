"""virtio-blk throughput and IOPS: pyvmm beside QEMU, same kernel, initramfs and image.

The Debian test kernel boots with the test initramfs (tests/assets.py) plus
a script that, inside the guest, measures

    sequential write   dd if=/dev/zero of=/dev/vda bs=1M oflag=direct
    sequential read    dd if=/dev/vda of=/dev/null bs=1M iflag=direct
    random 4 KiB reads a small static C program (bench/blk_randread.c), O_DIRECT

timing each with the guest's own clock, on a raw image in the host's page
cache. QEMU runs the same guest as `qemu-system-x86_64 -M microvm` with
virtio-blk-device on the same accelerator. 256 MiB each way and 10000
random reads take under a minute for both on the software CPU; set
PYVMM_BENCH_BLK_MB and PYVMM_BENCH_BLK_IOPS_COUNT to change the sizes, and
PYVMM_BENCH_ACCEL=kvm to compare on KVM.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.qemu_peer import tsc_cmdline  # noqa: E402
from bench.report import figure, run_guest, skipped  # noqa: E402
from tests.assets import find_linux_assets  # noqa: E402
from tests.boot.virtio_guest import overlay_initrd, script_output  # noqa: E402

SIZE_MB = int(os.environ.get("PYVMM_BENCH_BLK_MB", "256"))
IOPS_COUNT = int(os.environ.get("PYVMM_BENCH_BLK_IOPS_COUNT", "10000"))
# The software CPU by default: the development and CI hosts' KVM cannot run
# Linux (PLATFORM.md). PYVMM_BENCH_ACCEL=kvm on hosts where it can.
ACCEL = os.environ.get("PYVMM_BENCH_ACCEL", "tcg")
CMDLINE = "console=ttyS0 panic=-1 quiet"
TIMEOUT = 900

SCRIPT = """
now() {{ cut -d' ' -f1 /proc/uptime; }}
t0=$(now); dd if=/dev/zero of=/dev/vda bs=1M count={mb} oflag=direct 2>/dev/null; t1=$(now)
echo "seq-write {mb} $t0 $t1"
echo 3 > /proc/sys/vm/drop_caches
t0=$(now); dd if=/dev/vda of=/dev/null bs=1M count={mb} iflag=direct 2>/dev/null; t1=$(now)
echo "seq-read {mb} $t0 $t1"
/bin/blk_randread /dev/vda {count}
"""


def guest_figures(output: str) -> dict[str, float]:
    """MB/s for the sequential runs, IOPS for the random reads, from the script's output."""
    figures = {}
    for kind, megabytes, start, end in re.findall(r"(seq-write|seq-read) (\d+) ([\d.]+) ([\d.]+)", output):
        seconds = max(float(end) - float(start), 0.01)  # /proc/uptime ticks in 10 ms
        figures[kind] = int(megabytes) / seconds
    match = re.search(r"rand-read (\d+) ([\d.]+)", output)
    if match:
        figures["rand-read"] = int(match.group(1)) / float(match.group(2))
    return figures


def run(command: list[str]) -> dict[str, float]:
    return run_guest("bench_blk", command, lambda stdout: guest_figures(script_output(stdout)), timeout=TIMEOUT, cwd=REPO)


def main() -> None:
    assets = find_linux_assets()
    if assets is None:
        skipped("virtio-blk", "Linux test assets are absent (run `make test-assets`)")
        return
    if shutil.which("cc") is None:
        skipped("virtio-blk", "no C compiler for the random-read helper (apt-get install gcc libc6-dev)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        helper = workdir / "blk_randread"
        subprocess.run(["cc", "-O2", "-static", "-o", str(helper), str(HERE / "blk_randread.c")], check=True)
        script = SCRIPT.format(mb=SIZE_MB, count=IOPS_COUNT)
        initrd = overlay_initrd(assets, script, workdir / "initrd.img",
                                {"/bin/blk_randread": helper.read_bytes()})
        disk = workdir / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate((SIZE_MB + 16) << 20)
        accel = ACCEL
        pyvmm = run([sys.executable, "-m", "vmm", "boot", "--accel", accel, "--kernel", str(assets.kernel),
                     "--initrd", str(initrd), "--cmdline", CMDLINE, "--memory", "512M",
                     "--disk", f"{disk},format=raw"])
        qemu_binary = shutil.which("qemu-system-x86_64")
        qemu = None
        if qemu_binary:
            qemu = run([qemu_binary, "-accel", accel, "-M", "microvm,acpi=on,pit=on,rtc=on", "-m", "512M",
                        "-nographic", "-no-reboot", "-kernel", str(assets.kernel), "-initrd", str(initrd),
                        "-append", CMDLINE + tsc_cmdline(accel), "-drive", f"id=d0,file={disk},format=raw,if=none",
                        "-device", "virtio-blk-device,drive=d0"])
    note = f"{SIZE_MB} MiB"
    for kind, unit, what in (("seq-write", "MB/s", f"sequential write, dd bs=1M oflag=direct, {note}"),
                             ("seq-read", "MB/s", f"sequential read, dd bs=1M iflag=direct, {note}"),
                             ("rand-read", "IOPS", f"random 4 KiB reads, O_DIRECT, {IOPS_COUNT} reads")):
        figure(f"virtio-blk {what} ({accel})", unit, pyvmm.get(kind, 0), "QEMU microvm",
               qemu.get(kind, 0) if qemu is not None else None, lower_is_better=False,
               missing="" if qemu is not None else "apt-get install qemu-system-x86")

if __name__ == "__main__":
    main()
