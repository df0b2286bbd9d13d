"""Memory outside guest RAM: what the VMM process itself holds while an idle Linux guest runs.

Boots the Debian test kernel and busybox initramfs with 512 MiB of guest
RAM, waits for the initramfs's marker and a few idle seconds, then sums the
resident memory (Rss in /proc/PID/smaps) of every mapping of the VMM
process except guest RAM (the anonymous mappings at least as large as the
guest's RAM and no more than 4 MiB larger: QEMU rounds its RAM block up).
What remains is the VMM: its code, its libraries, its heap, the software
CPU's translation cache. pyvmm beside QEMU microvm, same guest, on each
accelerator that can boot Linux here, alternating, medians.

`python bench/bench_memory.py kvm` measures one accelerator only:
bench/nested_kvm.py runs it so in the nested tier's L1, whose KVM boots Linux
where this host's may not.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.qemu_peer import tsc_cmdline  # noqa: E402
from bench.report import figure, python_env, skipped  # noqa: E402
from tests.assets import MARKER, find_linux_assets  # noqa: E402
from vmm.kvm import quirks  # noqa: E402

RAM = 512 << 20
SLACK = 4 << 20
IDLE_SECONDS = 3
TIMEOUT = 300
REPEATS = int(os.environ.get("PYVMM_BENCH_BOOT_REPEATS", "3"))
# PYVMM_BENCH_CMDLINE: bench/nested_kvm.py adds `quiet`, as for bench_boot.
CMDLINE = os.environ.get("PYVMM_BENCH_CMDLINE", "console=ttyS0 panic=-1")
ACCELERATORS = ("kvm", "tcg")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)\s*(.*)$")


def rss_outside_guest_ram(pid: int) -> int:
    """Bytes resident in every mapping of `pid` but guest RAM."""
    total = 0
    size = inode = 0
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        mapping = _MAPPING.match(line)
        if mapping:
            size = int(mapping.group(2), 16) - int(mapping.group(1), 16)
            inode, name = int(mapping.group(3)), mapping.group(4)
        elif line.startswith("Rss:"):
            anonymous = inode == 0 and not name.startswith("/")
            if not (anonymous and RAM <= size <= RAM + SLACK):
                total += int(line.split()[1]) * 1024
    return total


def idle_memory(command: list[str]) -> int:
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True, env=python_env())
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    output = b""
    start = time.monotonic()
    try:
        while MARKER.encode() not in output:
            if time.monotonic() - start > TIMEOUT:
                raise SystemExit(f"bench_memory: no {MARKER!r} from {command[0]}")
            if selector.select(timeout=1.0):
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    raise SystemExit(f"bench_memory: {command[0]} exited: {output[-2000:]!r}")
                output += chunk
        time.sleep(IDLE_SECONDS)
        return rss_outside_guest_ram(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main(accelerators: list[str]) -> None:
    unknown = set(accelerators) - set(ACCELERATORS)
    if unknown:
        raise SystemExit(f"bench_memory: no such accelerator: {', '.join(sorted(unknown))} "
                         f"(choose from {', '.join(ACCELERATORS)})")
    assets = find_linux_assets()
    if assets is None:
        skipped("memory outside guest RAM", "Linux test assets are absent (run `make test-assets`)")
        return
    qemu = shutil.which("qemu-system-x86_64")
    kvm_runs_linux, why = quirks.can_run_linux() if os.path.exists("/dev/kvm") else (False, "no /dev/kvm")
    for accel in accelerators or ACCELERATORS:
        name = f"memory outside guest RAM, idle Linux ({accel})"
        if accel == "kvm" and not kvm_runs_linux:
            skipped(name, f"this host's KVM cannot boot Linux: {why}")
            continue
        pyvmm = [sys.executable, "-m", "vmm", "boot", "--accel", accel, "--kernel", str(assets.kernel),
                 "--initrd", str(assets.initrd), "--cmdline", CMDLINE, "--memory", "512M"]
        cpu = ["-cpu", "host"] if accel == "kvm" else []
        peer = [qemu, "-M", "microvm,acpi=on,pit=on,rtc=on", "-accel", accel, *cpu, "-m", "512M",
                "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
                "-append", CMDLINE + tsc_cmdline(accel)] if qemu else None
        ours, theirs = [], []
        for _ in range(REPEATS):
            ours.append(idle_memory(pyvmm))
            if peer:
                theirs.append(idle_memory(peer))
        mine = sorted(ours)[len(ours) // 2] / (1 << 20)
        other = sorted(theirs)[len(theirs) // 2] / (1 << 20) if theirs else None
        figure(name, "MiB", mine, "QEMU microvm", other, missing="" if qemu else "apt-get install qemu-system-x86")


if __name__ == "__main__":
    main(sys.argv[1:])
