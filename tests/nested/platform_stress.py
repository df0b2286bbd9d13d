"""How often the nested platform itself fails: L2 boots in a loop, pyvmm and QEMU in turn.

`sudo python -m tests.nested.platform_stress [MINUTES] [VMMS]` boots the
tier's L1 (tests/nested/l1_run.py) with QEMU packed in, and there boots a
2-vCPU L2 Linux again and again for MINUTES (20), with each VMM of VMMS
(`pyvmm,qemu`) in turn: pyvmm `--accel kvm`, QEMU `-enable-kvm -M microvm`.
Each boot runs work pinned to both CPUs and `seq 1 3000` on the serial
console three times, about three boot tests' worth of exits. Every boot
prints one line, ok or how it failed (with the end of its console); an L1
that hangs is seen as in the tier: five silent minutes, then QEMU's
monitor shows where its vCPUs are. Not a test: it measures QEMU's emulated
SVM, which docs/testing.md quotes.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.assets import find_linux_assets
from tests.boot.session import PROMPT, GuestSession
from tests.boot.test_linux_boot import WORK_ON_CPU
from tests.helpers import REPO

ROUNDS = 3
L2_TIMEOUT = 300


def start(vmm: str) -> GuestSession:
    assets = find_linux_assets()
    if vmm == "pyvmm":
        return GuestSession("--kernel", str(assets.kernel), "--initrd", str(assets.initrd), "--accel", "kvm",
                            "--cpus", "2", "--memory", "256M", timeout=L2_TIMEOUT)
    return GuestSession(timeout=L2_TIMEOUT, program=[
        shutil.which("qemu-system-x86_64"), "-M", "microvm,acpi=on,pit=on,rtc=on", "-enable-kvm", "-cpu", "host",
        "-smp", "2", "-m", "256M", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio", "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
        "-append", "console=ttyS0 panic=-1"])


def one_boot(vmm: str) -> str:
    """'ok', or what went wrong."""
    guest = start(vmm)
    try:
        guest.expect(PROMPT)
        guest.run("stty cols 500")
        guest.run(WORK_ON_CPU)
        for _ in range(ROUNDS):
            guest.run("(for c in 0 1; do w $c & done; wait)")
            lines = [line for line in guest.run("seq 1 3000").split("\n") if line.strip().isdigit()]
            if len(lines) != 3000:
                return f"seq printed {len(lines)} lines of 3000"
        return "ok"
    except AssertionError as failure:
        return f"{str(failure)[:300]}\n  console: " + guest.output[-1500:].decode(errors="replace").replace("\n", " | ")
    finally:
        guest.close()


def inside_l1(seconds: float, vmms: list[str]) -> None:
    started, boots = time.monotonic(), 0
    tally = {vmm: [0, 0] for vmm in vmms}
    while time.monotonic() - started < seconds:
        vmm = vmms[boots % len(vmms)]
        boots += 1
        begun = time.monotonic()
        outcome = one_boot(vmm)
        tally[vmm][outcome != "ok"] += 1
        print(f"platform-stress: boot {boots} {vmm}: {outcome} ({time.monotonic() - begun:.0f} s)", flush=True)
    print("platform-stress: " + ", ".join(f"{vmm} {ok} ok, {failed} failed" for vmm, (ok, failed) in tally.items()),
          flush=True)


def main() -> int:
    from tests.nested.l1_run import IN_CHECKOUT, PYTHON, run_in_l1

    minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 20
    vmms = sys.argv[2] if len(sys.argv) > 2 else "pyvmm,qemu"
    script = f"{IN_CHECKOUT}{PYTHON} -m tests.nested.platform_stress --inside {minutes * 60} {vmms}\n"
    with tempfile.TemporaryDirectory() as work:
        result = run_in_l1(script, REPO, minutes * 60 + 600, Path(work), echo=print, with_qemu=True)
    print(f"L1 run: status {result.status}")
    return 0 if result.status == 0 else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inside"]:
        inside_l1(float(sys.argv[2]), sys.argv[3].split(","))
    else:
        raise SystemExit(main())
