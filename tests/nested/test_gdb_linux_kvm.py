"""The Debian kernel under the real gdb on a real KVM: pyvmm's stub inside L1, gdb on the host.

L1 gets a second serial port (COM2) whose host end is a QEMU chardev socket
in this test's directory; gdb connects to that socket's path, and
tests/nested/gdb_in_l1.py relays between the port and the stub of a
`pyvmm boot -S --gdb unix:... --accel kvm --cmdline "... nokaslr"` inside
L1. One gdb session, no vmlinux:

- a hardware breakpoint (`hbreak`, the guest's debug registers through
  KVM_SET_GUEST_DEBUG) at start_kernel, found in the kernel's symbols
  (tests/boot/kernel_symbols.py) and with `nokaslr` where they say: gdb's
  `continue` from -S stops there, and `info registers rip` agrees;
- `delete` and `continue` boot the kernel to init and its shell, which L1's
  driver sets sleeping in a loop;
- gdb's Ctrl-C stops it (the stub kicks the vCPU out of KVM_RUN), and
  `info registers rip` agrees with the stop;
- a hardware watchpoint (`watch`, a debug register) on jiffies_64: `continue`
  stops just past the timer tick's write, with gdb's old and new values;
- `delete`, then single steps (KVM_GUESTDBG_SINGLESTEP), each landing where gdb's
  disassembly of the instruction (guest memory read through the guest's
  page tables) says it must;
- `kill` ends the VM with status 130.

Software breakpoints (`break`, an int3 in guest memory) cannot be checked
on this KVM: it runs on QEMU's emulated SVM, which checks INT3 against the
INTn intercept, not the #BP exception intercept KVM sets for
KVM_GUESTDBG_USE_SW_BP (raise_interrupt2 in QEMU's
target/i386/tcg/excp_helper.c), so the guest's
kernel takes gdb's int3 itself: with `break *hrtimer_nanosleep` after the
stop above it panicked at the next `sleep` (QEMU 10.0 as L1; on QEMU 7.2
QEMU's own gdb stub in the same L1 fared the same, and there the hardware
breakpoint was not hit either: 7.2's VMRUN loaded the guest's DR7 without
arming its breakpoints). tests/boot/test_gdb_linux.py checks the same
hardware breakpoint on the software CPU; tests/guest/test_gdb.py checks
breakpoints and watchpoints there and, as far as kvm_pvm allows, on KVM.

It boots an L1 of its own, about a minute, in both tiers (`make test-kvm`,
and `make test-kvm-ci` for CI).
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading

from tests.assets import MARKER, linux_assets  # noqa: F401 - linux_assets is a fixture
from tests.boot.kernel_symbols import kernel_symbols
from tests.guest.gdb_driver import gdb_command
from tests.helpers import REPO
from tests.nested.gdb_in_l1 import READY, SLEEPING, WARNING
from tests.nested.l1_run import IN_CHECKOUT, PYTHON, run_in_l1

SCRIPT = f"""{IN_CHECKOUT}
{PYTHON} -m tests.nested.gdb_in_l1 /dev/ttyS1 /tmp/pyvmm-gdb.sock
"""
L1_TIMEOUT = 900  # L1's boot, then the guest's (gdb_in_l1.GUEST_TIMEOUT) with room to spare
GDB_TIMEOUT = 600
STEPS = 4
KILLED = 130  # pyvmm's status when the debugger kills the VM

# gdb's `x/2i $pc`: the instruction at the stop, then the one after it.
DISASSEMBLY = re.compile(r"^=> (0x[0-9a-f]+):\t(\S+)[ \t]*(0x[0-9a-f]+)?.*\n +(0x[0-9a-f]+):", re.M)


def l1_serial_to(path) -> tuple[str, ...]:
    """QEMU options for L1's COM2 (ttyS1), its host end a unix socket at `path`."""
    return ("-chardev", f"socket,id=gdb,path={path},server=on,wait=off",
            "-device", "isa-serial,chardev=gdb,index=1")


def check_single_steps(out: str, steps: int) -> None:
    """Each step went where the disassembly before it says: a direct call or jump to its
    target, a ret to where the last call would return, anything else to the next instruction."""
    seen = [(int(pc, 16), op, int(target, 16) if target else None, int(after, 16))
            for pc, op, target, after in DISASSEMBLY.findall(out)]
    assert len(seen) == steps + 1, out
    returns = []
    for (pc, op, target, after), (landed, *_) in zip(seen, seen[1:], strict=False):
        where = f"stepped {op} at {pc:#x} to {landed:#x}:\n{out}"
        if op == "call":
            returns.append(after)
        if op in ("call", "jmp") and target is not None:
            assert landed == target, where
        elif op == "ret" and returns:
            assert landed == returns.pop(), where
        elif op.startswith(("j", "call", "ret", "iret", "sys", "int", "loop")):
            assert landed != pc, where  # conditional or indirect: anywhere else
        elif op.startswith("rep"):
            assert landed in (pc, after), where  # one iteration per step
        else:
            assert landed == after, where


def test_gdb_on_the_debian_kernel_on_a_real_kvm(tmp_path, linux_assets):  # noqa: F811
    symbols = kernel_symbols(linux_assets, ["start_kernel", "jiffies_64"])
    start_kernel, jiffies = symbols["start_kernel"], symbols["jiffies_64"]
    channel = tmp_path / "gdb.sock"
    ready, sleeping = threading.Event(), threading.Event()
    runs = []

    def echo(line: str) -> None:
        print(line, flush=True)
        if READY in line:
            ready.set()
        if SLEEPING in line:
            sleeping.set()

    def wait_for(event: threading.Event, what: str) -> None:
        while not event.wait(1):
            assert l1.is_alive(), f"L1 ended before {what}"

    l1 = threading.Thread(target=lambda: runs.append(run_in_l1(
        SCRIPT, REPO, L1_TIMEOUT, tmp_path, echo=echo, qemu_args=l1_serial_to(channel))))
    l1.start()
    gdb = None
    try:
        wait_for(ready, "pyvmm's stub was reachable")
        gdb = subprocess.Popen(gdb_command(str(channel), [
            f"hbreak *{start_kernel:#x}", "continue", "info registers rip", "delete", "continue",
            "info registers rip", f"watch *(long *){jiffies:#x}", "continue", "delete",
            *["x/2i $pc", "stepi"] * STEPS, "x/2i $pc", "kill"]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(sleeping, "the guest's shell was reached")
        gdb.send_signal(signal.SIGINT)  # Ctrl-C at gdb's prompt: gdb sends the interrupt byte
        out = gdb.communicate(timeout=GDB_TIMEOUT)[0].decode(errors="replace")
        print(f"gdb said:\n{out}", flush=True)
    finally:
        if gdb is not None and gdb.poll() is None:
            gdb.kill()
            gdb.wait()
        l1.join()
    (result,) = runs
    guest = result.files.get("output.txt", b"").decode(errors="replace")
    assert result.status == KILLED, f"L1 said:\n{guest or result.console[-5000:]}\ngdb said:\n{out}"

    assert f"Hardware assisted breakpoint 1 at {start_kernel:#x}" in out, out
    assert re.search(rf"^rip\s+{start_kernel:#x}\s", out, re.M), out
    interrupted = re.search(r"Program received signal SIGINT, Interrupt\.\n(0x[0-9a-f]+) in \?\? \(\)", out)
    assert interrupted, out
    assert re.search(rf"^rip\s+{interrupted.group(1)}\s", out, re.M), out
    ticked = re.search(rf"Hardware watchpoint 2: \*\(long \*\){jiffies:#x}\n\nOld value = (\d+)\n"
                       r"New value = (\d+)\n", out)
    assert ticked and int(ticked.group(2)) > int(ticked.group(1)), out
    check_single_steps(out, STEPS)  # only `x/2i $pc` marks the stop with =>
    assert "[Inferior 1 (Remote target) killed]" in out, out

    assert MARKER in guest, guest  # the guest's /init ran
    assert [line for line in guest.splitlines() if WARNING in line] == [], guest
    assert "killed by the debugger" in guest, guest
