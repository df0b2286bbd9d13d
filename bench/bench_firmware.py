"""Disk boot through firmware: from process start to the initramfs's "userspace reached" line.

Builds the test suite's syslinux disk (tests/boot/disk_images.py: the Debian
cloud kernel and the busybox initramfs on a FAT16 partition) and boots it
with `pyvmm boot DISK` and with QEMU microvm, both running the same SeaBIOS
build (Debian's bios-microvm.bin), on the same accelerator, in the same run.
Prints the median of each and the ratio. The kernel decompresses itself in
both guests (a bootloader loads a bzImage), so the figure sits beside
bench_boot.py's `--guest-decompress` one plus the firmware and syslinux.
Each VMM boots PYVMM_BENCH_REPEATS times (default 3), alternating.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_boot import cpu_note, median_times  # noqa: E402
from bench.qemu_peer import tsc_cmdline  # noqa: E402
from bench.report import figure, skipped  # noqa: E402
from boot.firmware import DEFAULT_BIOS  # noqa: E402
from tests.assets import find_linux_assets  # noqa: E402
from tests.boot.disk_images import syslinux_disk  # noqa: E402
from vmm.kvm import quirks  # noqa: E402

APPEND = "console=ttyS0 panic=-1"
NAME = "disk boot through SeaBIOS and syslinux to userspace"


def main() -> None:
    assets = find_linux_assets()
    if assets is None:
        sys.exit("bench_firmware: no test kernel; run `make test-assets` first")
    accel = "kvm" if os.path.exists("/dev/kvm") and quirks.can_run_linux()[0] else "tcg"
    if not DEFAULT_BIOS.is_file():
        skipped(f"{NAME} ({accel})", f"{DEFAULT_BIOS} is missing: apt-get install seabios")
        return
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as tmp:
        disk = syslinux_disk(Path(tmp) / "boot.raw", assets.kernel, assets.initrd, APPEND + tsc_cmdline(accel))
        commands = {"pyvmm": [sys.executable, "-m", "vmm", "boot", "--accel", accel, "-m", "512", str(disk)]}
        qemu = shutil.which("qemu-system-x86_64")
        if qemu:
            cpu = ["-cpu", "host"] if accel == "kvm" else []
            commands["QEMU"] = [
                qemu, "-M", "microvm,acpi=on,pit=on,rtc=on", "-accel", accel, *cpu, "-m", "512M", "-smp", "1",
                "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-bios", str(DEFAULT_BIOS),
                "-drive", f"if=none,id=disk,format=raw,file={disk}", "-device", "virtio-blk-device,drive=disk"]
        results, _ = median_times(commands)
    seconds, cpu = results["pyvmm"]
    peer_wall, peer_cpu = results.get("QEMU", (None, None))
    figure(f"{NAME} ({accel})", "s", seconds, "QEMU microvm with the same SeaBIOS", peer_wall,
           missing="" if qemu else "apt-get install qemu-system-x86", note=cpu_note(cpu, peer_cpu))


if __name__ == "__main__":
    main()
