"""Boot time: from process start to the initramfs's "userspace reached" line.

Boots the Debian cloud kernel with the test busybox initramfs
(`make test-assets`) with pyvmm (host-side decompression, the default, and
the kernel's own decompressor with --guest-decompress) and with QEMU's
microvm on the same accelerator, kernel, initrd and command line, in the
same run, and prints each time with the ratio to QEMU, and beside it the CPU
time (user + system, all threads) each VMM had used when the marker arrived,
which a loaded machine moves far less than the wall time. pyvmm's own figure
from its boot-timer port (--stats) is printed too.

The accelerator is what `--accel auto` picks here: KVM where KVM can run
Linux, the software CPU (QEMU: -accel tcg) elsewhere, e.g. on kvm_pvm hosts.
Each boots PYVMM_BENCH_REPEATS times (default 3), in turn; the figures are
medians.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.qemu_peer import tsc_cmdline  # noqa: E402
from bench.report import figure, process_cpu_seconds, python_env  # noqa: E402
from tests.assets import MARKER, find_linux_assets  # noqa: E402
from vmm.kvm import quirks  # noqa: E402

# PYVMM_BENCH_CMDLINE: bench/nested_kvm.py adds `quiet` (on a nested KVM every
# console byte is an exit costing milliseconds, for pyvmm and QEMU alike).
CMDLINE = os.environ.get("PYVMM_BENCH_CMDLINE", "console=ttyS0 panic=-1")
TIMEOUT = 300
REPEATS = int(os.environ.get("PYVMM_BENCH_REPEATS", "3"))


def time_to_marker(command: list[str]) -> tuple[float, float, str]:
    """Seconds from spawning `command` until MARKER appears on its stdout, and the CPU seconds it
    had used then; then stop it."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True, env=python_env())
    output = b""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    try:
        while MARKER.encode() not in output:
            if time.perf_counter() - start > TIMEOUT:
                raise RuntimeError(f"no {MARKER!r} from {command[0]} in {TIMEOUT} s: "
                                   f"{output[-2000:].decode(errors='replace')}")
            if not selector.select(timeout=1.0):
                continue  # nothing yet; check the time again
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"{command[0]} exited: {output[-2000:].decode(errors='replace')}")
            output += chunk
        elapsed = time.perf_counter() - start
        cpu = process_cpu_seconds(process.pid)
        # Power off cleanly so pyvmm prints its --stats (the boot-timer figure).
        process.stdin.write(b"poweroff -f\n")
        process.stdin.flush()
        try:
            rest, _ = process.communicate(timeout=60)
            output += rest
        except subprocess.TimeoutExpired:
            pass
        return elapsed, cpu, output.decode(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def median_times(commands: dict[str, list[str]]) -> tuple[dict[str, tuple[float, float]], str]:
    """Each command's median (wall, CPU) seconds to the marker, the commands run in turn
    REPEATS times; and the output of the first command's last run."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    first_output = ""
    for _ in range(REPEATS):
        for index, (name, command) in enumerate(commands.items()):
            seconds, cpu, output = time_to_marker(command)
            samples[name].append((seconds, cpu))
            if index == 0:
                first_output = output
    return {name: (statistics.median(wall for wall, _ in runs), statistics.median(cpu for _, cpu in runs))
            for name, runs in samples.items()}, first_output


def cpu_note(cpu: float, peer_cpu: float | None) -> str:
    """The figure's note: the medians' CPU time beside the wall time the figure compares."""
    note = f"median of {REPEATS}; CPU time (user + system) to userspace: pyvmm {cpu:.2f} s"
    return note if peer_cpu is None else f"{note}, QEMU {peer_cpu:.2f} s"


def main() -> None:
    assets = find_linux_assets()
    if assets is None:
        sys.exit("bench_boot: no test kernel; run `make test-assets` first")
    kvm_runs_linux = os.path.exists("/dev/kvm") and quirks.can_run_linux()[0]
    accel = "kvm" if kvm_runs_linux else "tcg"
    common = ["--kernel", str(assets.kernel), "--initrd", str(assets.initrd), "--cmdline", CMDLINE,
              "--memory", "512M"]
    pyvmm = [sys.executable, "-m", "vmm", "boot", "--accel", accel, "--stats", *common]
    commands = {"host decompression": pyvmm, "--guest-decompress": [*pyvmm, "--guest-decompress"]}
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        # QEMU's default CPU model under TCG: with -cpu max this kernel fails
        # to calibrate its TSC against the PIT and hangs.
        cpu = ["-cpu", "host"] if accel == "kvm" else []
        commands["QEMU"] = [qemu, "-M", "microvm,acpi=on,pit=on,rtc=on", "-accel", accel, *cpu, "-m", "512M",
                            "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                            "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
                            "-append", CMDLINE + tsc_cmdline(accel)]
    results, output = median_times(commands)
    peer_wall, peer_cpu = results.pop("QEMU", (None, None))
    missing = "" if qemu else "apt-get install qemu-system-x86"
    for name, (seconds, cpu) in results.items():
        figure(f"Linux boot to userspace ({accel}, {name})", "s", seconds, "QEMU microvm", peer_wall,
               missing=missing, note=cpu_note(cpu, peer_cpu))
    timer = re.search(r"userspace reached ([0-9.]+) s", output)
    if timer:
        print(f"  pyvmm boot-timer port (host decompression): {float(timer.group(1)):.2f} s")
    if exits := re.search(r"^  exits: (.*)$", output, re.MULTILINE):
        print(f"  pyvmm exits per boot to userspace and poweroff, by reason: {exits.group(1)}")
        for line in re.findall(r"^  (?:pio|mmio) (?!unclaimed).*accesses$", output, re.MULTILINE):
            print(f"    {line.strip()}")

if __name__ == "__main__":
    main()
