"""Boot time and memory on a real KVM: pyvmm (--accel kvm) beside QEMU (-enable-kvm, microvm), in one L1.

This host's own KVM may not run Linux (kvm_pvm, PLATFORM.md), so the
benchmark runs bench/bench_boot.py inside the nested tier's L1 (tests/nested:
Linux on QEMU's software CPU with an emulated AMD SVM, whose kvm-amd is a
real KVM), with QEMU packed into L1 as the peer. There bench_boot picks KVM
for both: the same kernel, initramfs and command line, median of
PYVMM_BENCH_REPEATS boots (default 5), and pyvmm's exits per boot by reason.
Then bench/bench_memory.py measures, on that KVM, what each VMM process holds
outside guest RAM while the same Linux idles.

The command line carries `quiet`: on a nested KVM each exit that reaches
the VMM costs milliseconds, so a chatty console would measure the console.
Absolute times are those of a KVM nested in a software CPU; read the ratio.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.nested.l1_run import IN_CHECKOUT, PYTHON, run_in_l1  # noqa: E402

REPEATS = int(os.environ.get("PYVMM_BENCH_REPEATS", "5"))
TIMEOUT = 3600


def main() -> int:
    script = f"""{IN_CHECKOUT}
export PYVMM_BENCH_REPEATS={REPEATS} PYVMM_BENCH_CMDLINE='console=ttyS0 panic=-1 quiet'
{PYTHON} bench/bench_boot.py || exit
exec {PYTHON} bench/bench_memory.py kvm
"""
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        result = run_in_l1(script, REPO, TIMEOUT, Path(work), with_qemu=True)
    output = result.files.get("output.txt", b"").decode(errors="replace")
    if result.status != 0:
        print(f"nested_kvm: the benchmark failed in L1 (status {result.status}); L1 said:\n"
              + "\n".join(result.console.splitlines()[-80:]), file=sys.stderr)
        return 1
    print("in an L1 Linux on QEMU's software CPU (-cpu max, emulated SVM), its kvm-amd:")
    print(output.rstrip())
    print(f"(whole L1 run {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
