"""virtio-blk throughput and IOPS: pyvmm beside QEMU, same kernel, initramfs and image.

The Debian test kernel boots with the test initramfs (tests/assets.py) plus
a script that, inside the guest, measures one of

    sequential write   dd if=/dev/zero of=/dev/vda bs=1M oflag=direct
    sequential read    dd if=/dev/vda of=/dev/null bs=1M iflag=direct
    random 4 KiB reads a small static C program (bench/blk_randread.c), O_DIRECT

timing it with the guest's own clock (/proc/timer_list's nanoseconds; the 10 ms
of /proc/uptime are a tenth of a fast run). QEMU runs the same guest as
`qemu-system-x86_64 -M microvm` with virtio-blk-device on the same
accelerator and the same raw image.

The image is written out before the first boot (a sparse one would make the
first VMM to write pay the host's allocation). Both VMMs go through the
host's page cache: QEMU's default (cache=writeback) and pyvmm's only mode.
(With cache=none QEMU reads and writes this host's disk with O_DIRECT, which
pyvmm cannot do, and its random reads were half as fast.)

The CPU time each VMM spent on a test is read from /proc/PID/stat (user +
system, all its threads) when the guest prints a line before the test and
one after it: the disk work alone, without the boot (a boot costs about 5 s
of CPU on the software CPU and varies by a few tenths between runs, more
than a 256 MiB read costs). It is printed beside each figure, per MiB or per
read. One boot runs the three tests in turn; pyvmm and QEMU alternate,
REPEATS times (PYVMM_BENCH_BLK_REPEATS, default 3), and the medians are
kept. 256 MiB each way and 10000 random reads; PYVMM_BENCH_BLK_MB and
PYVMM_BENCH_BLK_IOPS_COUNT change the sizes, and PYVMM_BENCH_ACCEL=kvm
compares on KVM. pyvmm carries requests out through its compiled request
path where it was built (devices/virtio/blk_requests.py), and the figures
say which path ran; PYVMM_BLK_REQUESTS=python measures the Python one.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.qemu_peer import tsc_cmdline  # noqa: E402
from bench.report import figure, python_env, skipped  # noqa: E402
from devices.virtio.blk_requests import use_compiled_requests  # noqa: E402
from tests.assets import find_linux_assets  # noqa: E402
from tests.boot.virtio_guest import overlay_initrd, script_output  # noqa: E402

SIZE_MB = int(os.environ.get("PYVMM_BENCH_BLK_MB", "256"))
IOPS_COUNT = int(os.environ.get("PYVMM_BENCH_BLK_IOPS_COUNT", "10000"))
REPEATS = int(os.environ.get("PYVMM_BENCH_BLK_REPEATS", "3"))
# The software CPU by default: the development and CI hosts' KVM cannot run
# Linux (PLATFORM.md). PYVMM_BENCH_ACCEL=kvm on hosts where it can.
ACCEL = os.environ.get("PYVMM_BENCH_ACCEL", "tcg")
CMDLINE = "console=ttyS0 panic=-1 quiet"
TIMEOUT = 900

CLOCK = "now() {{ sed -n 's/^now at \\([0-9]*\\) nsecs$/\\1/p' /proc/timer_list | head -1; }}\n"
# The tests, in the order they run (the reads read what the write wrote), each between two
# marker lines (MARK start/end TEST) at which the bench reads the VMM's CPU time.
MARK = "bench-blk"
TESTS = {
    "seq-write": CLOCK + "t0=$(now); dd if=/dev/zero of=/dev/vda bs=1M count={mb} oflag=direct 2>/dev/null;"
                         " t1=$(now); echo \"seq-write {mb} $t0 $t1\"\n",
    "seq-read": CLOCK + "t0=$(now); dd if=/dev/vda of=/dev/null bs=1M count={mb} iflag=direct 2>/dev/null;"
                        " t1=$(now); echo \"seq-read {mb} $t0 $t1\"\n",
    "rand-read": "/bin/blk_randread /dev/vda {count}\n",
}
SCRIPT = "".join(f"echo {MARK} start {test}\n{body}echo {MARK} end {test}\n" for test, body in TESTS.items())


def guest_figure(test: str, output: str) -> float:
    """MB/s for a sequential test, IOPS for the random reads, from the script's output."""
    if test == "rand-read":
        match = re.search(r"rand-read (\d+) ([\d.]+)", output)
        assert match, f"no rand-read line in the guest's output:\n{output[-2000:]}"
        return int(match.group(1)) / float(match.group(2))
    match = re.search(rf"{test} (\d+) (\d+) (\d+)", output)
    assert match, f"no {test} line in the guest's output:\n{output[-2000:]}"
    return int(match.group(1)) / ((int(match.group(3)) - int(match.group(2))) / 1e9)


def process_cpu_seconds(pid: int) -> float:
    """User + system seconds a running process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(vmm: str, command: list[str]) -> dict[str, tuple[float, float]]:
    """One boot through all the tests: {test: (the guest's figure, the VMM's CPU seconds for it)}."""
    cpu: dict[tuple[str, str], float] = {}
    lines = []
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                                   cwd=REPO, env=python_env())
        watchdog = threading.Timer(TIMEOUT, process.kill)
        watchdog.start()
        try:
            for raw in process.stdout:
                line = raw.decode(errors="replace")
                lines.append(line)
                marker = re.match(rf"{MARK} (start|end) (\S+)", line.strip())
                if marker:
                    cpu[marker.groups()] = process_cpu_seconds(process.pid)
            process.wait()
        finally:
            watchdog.cancel()
            process.kill()
            process.wait()
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace")
    try:
        output = script_output("".join(lines))
        return {test: (guest_figure(test, output), cpu[("end", test)] - cpu[("start", test)]) for test in TESTS}
    except (AssertionError, KeyError) as err:
        raise SystemExit(f"bench_blk: {vmm} failed (status {process.returncode}): {err!r}\n{errors[-2000:]}") from None


def commands(assets, initrd: Path, disk: Path) -> dict[str, list[str]]:
    pyvmm = [sys.executable, "-m", "vmm", "boot", "--accel", ACCEL, "--kernel", str(assets.kernel),
             "--initrd", str(initrd), "--cmdline", CMDLINE, "--memory", "512M", "--disk", f"{disk},format=raw"]
    vmms = {"pyvmm": pyvmm}
    qemu_binary = shutil.which("qemu-system-x86_64")
    if qemu_binary:
        vmms["QEMU"] = [qemu_binary, "-accel", ACCEL, "-M", "microvm,acpi=on,pit=on,rtc=on", "-m", "512M",
                        "-nographic", "-no-reboot", "-kernel", str(assets.kernel), "-initrd", str(initrd),
                        "-append", CMDLINE + tsc_cmdline(ACCEL), "-drive", f"id=d0,file={disk},format=raw,if=none",
                        "-device", "virtio-blk-device,drive=d0"]
    return vmms


def main() -> None:
    assets = find_linux_assets()
    if assets is None:
        skipped("virtio-blk", "Linux test assets are absent (run `make test-assets`)")
        return
    if shutil.which("cc") is None:
        skipped("virtio-blk", "no C compiler for the random-read helper (apt-get install gcc libc6-dev)")
        return
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        helper = workdir / "blk_randread"
        subprocess.run(["cc", "-O2", "-static", "-o", str(helper), str(HERE / "blk_randread.c")], check=True)
        disk = workdir / "disk.raw"
        with open(disk, "wb") as f:
            # Written out, not sparse: the first VMM to write a block would also pay the host's
            # allocating it (pyvmm, which runs first: its 256 MiB write took 0.92-1.05 s of CPU
            # into a sparse file, 0.26-0.35 s into this one).
            for _ in range(SIZE_MB + 16):
                f.write(bytes(1 << 20))
        initrd = overlay_initrd(assets, SCRIPT.format(mb=SIZE_MB, count=IOPS_COUNT), workdir / "tests.img",
                                {"/bin/blk_randread": helper.read_bytes()})
        for _ in range(REPEATS):
            for vmm, command in commands(assets, initrd, disk).items():
                for test, sample in run(vmm, command).items():
                    samples.setdefault((vmm, test), []).append(sample)
    report(samples)


def report(samples: dict[tuple[str, str], list[tuple[float, float]]]) -> None:
    def median(vmm: str, test: str, which: int) -> float:
        return statistics.median(sample[which] for sample in samples[(vmm, test)])

    have_qemu = ("QEMU", "rand-read") in samples
    # (PYVMM_BLK_REQUESTS=python measures the Python one where the compiled one was built.)
    request_path = "compiled" if use_compiled_requests() else "Python"
    for test, unit, what, work, per in (
            ("seq-write", "MB/s", f"sequential write, dd bs=1M oflag=direct, {SIZE_MB} MiB", SIZE_MB, "ms per MiB"),
            ("seq-read", "MB/s", f"sequential read, dd bs=1M iflag=direct, {SIZE_MB} MiB", SIZE_MB, "ms per MiB"),
            ("rand-read", "IOPS", f"random 4 KiB reads, O_DIRECT, {IOPS_COUNT} reads", IOPS_COUNT / 1000,
             "us per read")):
        cpu = {vmm: median(vmm, test, 1) / work * 1000 for vmm in ("pyvmm", "QEMU") if (vmm, test) in samples}
        note = (f"median of {REPEATS}; CPU time (user + system) of the VMM during the test, {per}: "
                + ", ".join(f"{vmm} {value:.2f}" for vmm, value in cpu.items())
                + f"; pyvmm's request path: {request_path}")
        figure(f"virtio-blk {what} ({ACCEL})", unit, median("pyvmm", test, 0), "QEMU microvm",
               median("QEMU", test, 0) if have_qemu else None, lower_is_better=False,
               missing="" if have_qemu else "apt-get install qemu-system-x86", note=note)


if __name__ == "__main__":
    main()
