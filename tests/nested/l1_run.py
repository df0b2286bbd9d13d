"""Boot the L1 Linux under QEMU's software CPU and run one shell script inside it.

L1 is QEMU 10's microvm (tests/nested/l1_qemu.py says why not Debian 12's
QEMU 7.2) with `-cpu max` (AMD SVM with nested paging, emulated), two vCPUs
and 3 GiB. Its /init loads kvm-amd (so /dev/kvm is a real KVM),
runs the script with its output on the console and in /results, and writes
/results as a tar archive to a virtio-blk disk the host reads afterwards:
no parsing of a console that the L1 kernel also writes to. When L1 runs out
of time, or falls silent for minutes though it says it is alive every minute,
QEMU's monitor adds every L1 vCPU's registers and the code at its RIP to the
console log: a hung L1 cannot say where it is stuck itself.

Traps (PLATFORM.md, "A real KVM, nested"; measured under QEMU 7.2, settings kept): without `tsc_early_khz=` about
4 L1 boots in 6 hang calibrating the TSC; without `pit=on` microvm under TCG
hangs in about half the boots; without `tsc=reliable` L1 keeps time by
counting timer ticks, and its clock falls behind when the host is busy (below).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.assets import find_linux_assets
from tests.helpers import die_with_test_runner
from tests.nested import l1_image
from tests.nested.l1_image import ASSETS, MODULES, RESULTS, SITE, SRC, python_in_l1
from tests.nested.l1_qemu import l1_qemu

RESULTS_DISK_MIB = 64
# Run scripts start with this: the checkout as cwd, its code and the venv's
# packages importable, the L2 assets where tests/assets.py looks, and
# PYVMM_IN_L1 for a test that asks less of this platform than of others.
PYTHON = python_in_l1()
IN_CHECKOUT = f"""cd {SRC}
export PYTHONPATH={SRC}:{SITE} PYVMM_ASSETS={ASSETS} PYVMM_IN_L1=1
"""
L1_MEMORY = "3G"
L1_CPUS = 2

# KVM's static keys held on for L1's whole life (tests/nested/kvm_static_keys.py says
# why): every key KVM flips as VMs and vCPUs come and go had L1's kernel text
# rewritten live, and QEMU 7.2's threaded software CPU could keep running a stale
# int3 from it, forever (L1 hung; pyvmm's vCPU thread spun in KVM, L2 froze).
HOLD_KEYS = f"{SRC}/tests/nested/kvm_static_keys.py hold"
# L1 says it is alive this often; as long again five times over without a line
# from L1, and it is taken for hung (its timers stopped): no need to wait out
# the whole run's timeout.
HEARTBEAT_SECONDS = 60
SILENT_SECONDS = 5 * HEARTBEAT_SECONDS

INIT = f"""#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat {MODULES}/order); do insmod $module || echo "pyvmm-l1: insmod $module failed"; done
echo "pyvmm-l1: $(grep -m1 'model name' /proc/cpuinfo)"
echo "pyvmm-l1: $(nproc) CPUs, $(grep -c svm /proc/cpuinfo) with svm, /dev/kvm: $(ls -l /dev/kvm 2>&1)"
# Where KASLR put the kernel and the modules: what the monitor's RIPs of a hung L1 are read against.
echo "pyvmm-l1: $(grep -w _text /proc/kallsyms); modules at $(cut -d' ' -f1,6 /proc/modules | tr '\n' ' ')"
{PYTHON} {HOLD_KEYS} </dev/null >/dev/console 2>&1 &
(while sleep {HEARTBEAT_SECONDS}; do echo "pyvmm-l1: alive, uptime $(cut -d' ' -f1 /proc/uptime) s"; done) \
    </dev/null >/dev/console 2>&1 &
for i in $(seq 300); do [ -e /tmp/vm-held ] && break; sleep 0.1; done
[ -e /tmp/vm-held ] || echo "pyvmm-l1: could not hold KVM's static keys"
{{ sh /run.sh; echo $? > {RESULTS}/status; }} 2>&1 | tee {RESULTS}/output.txt
tar -cf /dev/vda -C {RESULTS} .
sync
echo "pyvmm-l1: done"
poweroff -f
"""


@dataclass
class L1Result:
    status: int | None          # the script's exit status; None if it never finished
    files: dict[str, bytes]     # what the script left in /results (output.txt: its output)
    console: str                # everything L1 printed on its serial console


def host_tsc_khz() -> int | None:
    """The host CPU's rate as /proc/cpuinfo states it, for L1's tsc_early_khz=."""
    try:
        match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(float(match.group(1)) * 1000) if match else None


def qemu_command(kernel: Path, initrd: Path, results_disk: Path) -> list[str]:
    # tsc=reliable: QEMU's software CPU reads one counter, the host's TSC, for
    # every vCPU, yet Linux calls the TSC of a two-CPU AMD machine without an
    # invariant TSC unsynchronized and falls back to refined-jiffies, a clock
    # that advances only by timer ticks. QEMU drops ticks while its threads
    # wait for a host CPU, so on a busy host L1's clock ran at 0.5-0.65 of real
    # time, and everything timed inside L1 (a test's timeout, the benchmark,
    # the console's progress lines) stretched with it.
    append = "console=ttyS0 panic=-1 tsc=reliable"
    if khz := host_tsc_khz():
        append += f" tsc_early_khz={khz}"
    return [*l1_qemu().command, "-accel", "tcg,thread=multi,tb-size=1024", "-cpu", "max",
            "-M", "microvm,acpi=on,pit=on,rtc=on", "-smp", str(L1_CPUS), "-m", L1_MEMORY,
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-drive", f"id=results,file={results_disk},format=raw,if=none",
            "-device", "virtio-blk-device,drive=results"]


def run_in_l1(script: str, repo: Path, timeout: float, work: Path,
              echo: Callable[[str], None] | None = None, with_qemu: bool = False,
              qemu_args: tuple[str, ...] = (), more: dict[str, l1_image.Tree] | None = None) -> L1Result:
    """Boot L1 with `script` as /run.sh (cwd /), wait at most `timeout` seconds, collect /results.

    `echo` gets each console line as it comes; `with_qemu` packs QEMU too (the
    peer of the benchmark and of kvm-unit-tests); `qemu_args` adds to L1's
    machine (a channel to the host, say); `more` adds trees of files, each
    cached as an archive under its name. QEMU is killed on every way out.
    """
    assets = find_linux_assets()
    if assets is None:
        raise RuntimeError("the Linux test assets are missing: run `make test-assets`")
    kernel = l1_image.l1_kernel()
    archives = [l1_image.cached_archive("base", l1_image.base_tree(kernel, assets))]
    if with_qemu:
        archives.append(l1_image.cached_archive("qemu", l1_image.qemu_tree()))
    archives += [l1_image.cached_archive(name, tree) for name, tree in (more or {}).items()]
    initrd = l1_image.initramfs(archives, l1_image.payload(repo, INIT, {"/run.sh": script.encode()}),
                                work / "l1-initrd.cpio")
    results_disk = work / "l1-results.img"
    with open(results_disk, "wb") as f:
        f.truncate(RESULTS_DISK_MIB << 20)

    lines: list[str] = []
    started = last_line = time.monotonic()
    monitor = work / "l1-monitor.sock"
    process = subprocess.Popen([*qemu_command(kernel.kernel, initrd, results_disk),
                                "-monitor", f"unix:{monitor},server=on,wait=off", *qemu_args],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=die_with_test_runner)

    def say(line: str) -> None:
        lines.append(line)
        if echo:
            echo(line)

    def pump() -> None:
        nonlocal last_line
        for raw in process.stdout:
            last_line = time.monotonic()
            # Host seconds first: L1's own timestamps cannot tell a slow L1 from a stuck one.
            say(f"[{last_line - started:7.1f}] " + raw.decode(errors="replace").rstrip("\r\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if hang := wait_for_l1(process, started, timeout, lambda: last_line):
            # Where L1's vCPUs are, for a hang that keeps L1 from saying anything itself.
            for line in vcpu_state(monitor).splitlines():
                say(f"pyvmm-l1: monitor: {line}")
            say(f"pyvmm-l1: {hang}; QEMU killed")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=10)
        process.stdout.close()
        initrd.unlink(missing_ok=True)
    console = "\n".join(lines)
    files = read_results(results_disk)
    results_disk.unlink(missing_ok=True)
    status = files.get("status")
    return L1Result(int(status) if status and status.strip().isdigit() else None, files, console)


def wait_for_l1(process: subprocess.Popen, started: float, timeout: float,
                last_line: Callable[[], float]) -> str | None:
    """Wait for QEMU to end; None if it did, else why L1 is taken for hung."""
    while process.poll() is None:
        now = time.monotonic()
        if now - started >= timeout:
            return f"timed out after {timeout:.0f} s"
        if now - last_line() >= SILENT_SECONDS:
            return f"silent for {now - last_line():.0f} s (it says it is alive every {HEARTBEAT_SECONDS} s)"
        time.sleep(1)
    return None


def vcpu_state(monitor: Path, seconds: float = 20) -> str:
    """Every L1 vCPU's registers and the code at its RIP, from QEMU's monitor (or why it did not answer)."""
    commands = ["info registers -a"]
    for cpu in range(L1_CPUS):
        commands += [f"cpu {cpu}", "x/8i $pc"]
    answers = []
    try:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(seconds)
            connection.connect(str(monitor))
            received = b""
            for command in ["", *commands]:
                if command:
                    connection.sendall(command.encode() + b"\n")
                while not received.endswith(b"(qemu) "):  # the prompt after the answer
                    chunk = connection.recv(65536)
                    if not chunk:
                        raise OSError("the monitor closed")
                    received += chunk
                # The answer without the prompt, and without the monitor's echo of
                # the command (redrawn at every key with terminal escapes).
                answer = received.decode(errors="replace").removesuffix("(qemu) ").split("\n")
                answers += [f"(qemu) {command}", *answer[1:]] if command else answer
                received = b""
    except OSError as err:
        answers.append(f"no answer from QEMU's monitor: {err}")
    return "\n".join(line.rstrip("\r") for line in answers)


def read_results(disk: Path) -> dict[str, bytes]:
    """The files L1 wrote to the results disk (none if it never got that far)."""
    try:
        with tarfile.open(disk, "r:") as archive:
            return {member.name.removeprefix("./"): archive.extractfile(member).read()
                    for member in archive.getmembers() if member.isfile()}
    except tarfile.ReadError:
        return {}


def main() -> int:
    """`python -m tests.nested.l1_run 'SHELL COMMANDS'`: run commands in L1, console on stdout."""
    import sys

    from tests.helpers import REPO

    with tempfile.TemporaryDirectory() as work:
        started = time.monotonic()
        result = run_in_l1(sys.argv[1], REPO, float(os.environ.get("PYVMM_L1_TIMEOUT", "600")), Path(work),
                           echo=print)
        print(f"L1 run: status {result.status}, {time.monotonic() - started:.1f} s")
    return 0 if result.status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
