"""Guest console output: `seq 1 100000` (about 590 KB) on the serial port, and through virtio-console.

The Debian test kernel boots with the test initramfs and a script that runs
`seq 1 100000` twice, once to ttyS0 (the 16550 UART) and once to hvc0
(virtio-console), timing each with the guest's own clock (both guests
read a TSC that runs at the host's rate: the figure is wall time). pyvmm
runs it on the software CPU (`--console virtio` adds the virtio-console;
the script's command line keeps the kernel console on ttyS0), QEMU as
microvm on TCG with a virtio-serial device whose console shares stdio with
the serial port. Every line must arrive intact on the host, both ways, or
the run fails. Lines per second; with PYVMM_BENCH_CONSOLE_REPEATS the VMMs
alternate and each figure is a median. PYVMM_BENCH_CONSOLE_LINES changes
the count.

Beside it, the CPU time (user + system, all threads) the VMM process used
while the guest printed, which a loaded machine moves less than the wall
time: read from /proc when the guest's line before each run of `seq`, and
the one after it, reach the host.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.qemu_peer import tsc_cmdline  # noqa: E402
from bench.report import figure, process_cpu_seconds, python_env, skipped  # noqa: E402
from tests.assets import find_linux_assets  # noqa: E402
from tests.boot.virtio_guest import overlay_initrd, script_output  # noqa: E402

LINES = int(os.environ.get("PYVMM_BENCH_CONSOLE_LINES", "100000"))
# One run each by default: each figure already averages 100 000 lines (a minute of guest time).
REPEATS = int(os.environ.get("PYVMM_BENCH_CONSOLE_REPEATS", "1"))
CMDLINE = "console=ttyS0 panic=-1 quiet"
TIMEOUT = 900

SCRIPT = """
now() {{ cut -d' ' -f1 /proc/uptime; }}
echo "console-begin serial"
t0=$(now); seq 1 {lines} > /dev/ttyS0; t1=$(now)
echo "console-time serial $t0 $t1"
echo "console-begin virtio"
t0=$(now); seq 1 {lines} > /dev/hvc0; t1=$(now)
echo "console-time virtio $t0 $t1"
"""
# The guest's lines around each run, as the host reads them (the kernel console adds \r).
MARKER = re.compile(rb"console-(?:begin|time) (?:serial|virtio)")


def run_vmm(command: list[str]) -> tuple[int, str, dict[str, float]]:
    """Run one VMM to its end: (status, stdout, CPU seconds it used between each kind's markers)."""
    with tempfile.TemporaryFile() as stderr:
        vmm = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                               cwd=REPO, env=python_env())
        output, cpu_at = bytearray(), {}
        try:
            while chunk := os.read(vmm.stdout.fileno(), 1 << 16):
                # Look where a marker may have been cut in two by the last read.
                seen = len(output)
                output += chunk
                for match in MARKER.finditer(output, max(seen - 32, 0)):
                    cpu_at.setdefault(match[0].decode(), process_cpu_seconds(vmm.pid))
            status = vmm.wait(timeout=TIMEOUT)
        finally:
            if vmm.poll() is None:
                vmm.kill()
                vmm.wait()
            vmm.stdout.close()
    cpu = {}
    for kind in ("serial", "virtio"):
        begin, end = cpu_at.get(f"console-begin {kind}"), cpu_at.get(f"console-time {kind}")
        if begin is not None and end is not None:
            cpu[kind] = end - begin
    return status, output.decode(errors="replace"), cpu


def lines_per_second(command: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Lines per second by the guest's clock, and the VMM's CPU seconds, for each console."""
    status, stdout, cpu = run_vmm(command)
    try:
        output = script_output(stdout).replace("\r\n", "\n")
    except AssertionError as err:
        raise SystemExit(f"bench_console: {command[0]} failed (status {status}): {err}") from None
    # Whole lines of kernel messages may come in between (a loaded host makes
    # guests warn); every number must arrive, intact and in order, both ways.
    numbers = [line for line in output.splitlines() if line.isdigit()]
    expected = [str(n) for n in range(1, LINES + 1)] * 2
    if numbers != expected:
        first_bad = next((i for i, (a, b) in enumerate(zip(numbers, expected, strict=False)) if a != b),
                         min(len(numbers), len(expected)))
        raise SystemExit(f"bench_console: {command[0]}: {len(numbers)} of {len(expected)} lines arrived; "
                         f"the first wrong one is line {first_bad}: "
                         f"{numbers[first_bad:first_bad + 3] if first_bad < len(numbers) else 'missing'}")
    figures = {}
    for kind, start, end in re.findall(r"console-time (\w+) ([\d.]+) ([\d.]+)", output):
        figures[kind] = LINES / max(float(end) - float(start), 0.01)  # /proc/uptime ticks in 10 ms
    return figures, cpu


def main() -> None:
    assets = find_linux_assets()
    if assets is None:
        skipped("guest console output", "Linux test assets are absent (run `make test-assets`)")
        return
    qemu = shutil.which("qemu-system-x86_64")
    with tempfile.TemporaryDirectory() as tmp:
        initrd = overlay_initrd(assets, SCRIPT.format(lines=LINES), Path(tmp) / "initrd.img")
        common = ["--kernel", str(assets.kernel), "--initrd", str(initrd), "--memory", "512M"]
        pyvmm = [sys.executable, "-m", "vmm", "boot", "--accel", "tcg", *common[:4], "--cmdline", CMDLINE,
                 *common[4:], "--console", "virtio"]
        peer = [qemu, "-accel", "tcg", "-M", "microvm,acpi=on,pit=on,rtc=on", "-m", "512M", "-nodefaults",
                "-no-user-config", "-nographic", "-no-reboot", "-kernel", str(assets.kernel),
                "-initrd", str(initrd), "-append", CMDLINE + tsc_cmdline("tcg"),
                "-chardev", "stdio,id=out,mux=on", "-serial", "chardev:out",
                "-device", "virtio-serial-device", "-device", "virtconsole,chardev=out"] if qemu else None
        ours, theirs = [], []
        for _ in range(REPEATS):
            ours.append(lines_per_second(pyvmm))
            if peer:
                theirs.append(lines_per_second(peer))
    for kind, what in (("serial", "serial port (ttyS0)"), ("virtio", "virtio-console (hvc0)")):
        mine = statistics.median_low(rate[kind] for rate, _ in ours)
        other = statistics.median_low(rate[kind] for rate, _ in theirs) if theirs else None
        cpu = f"CPU time (user + system) of the VMM while the guest printed: pyvmm {_median_cpu(ours, kind)}"
        if theirs:
            cpu += f", QEMU {_median_cpu(theirs, kind)}"
        figure(f"guest console output, {LINES} lines on the {what} (tcg)", "lines/s", mine,
               "QEMU microvm TCG", other, lower_is_better=False,
               missing="" if qemu else "apt-get install qemu-system-x86", note=cpu)


def _median_cpu(runs: list[tuple[dict, dict]], kind: str) -> str:
    samples = [cpu[kind] for _, cpu in runs if kind in cpu]
    return f"{statistics.median_low(samples):.2f} s" if samples else "not read"


if __name__ == "__main__":
    main()
