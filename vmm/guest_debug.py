"""What a debugger asks of an accelerator: accelerator-neutral, as vmm/accel.py is.

The gdb stub (vmm/gdb/debugger.py) decides, for each vCPU it resumes, a
`GuestDebug`: single-step or not, and the instruction breakpoints and
watchpoints the accelerator must watch itself (the software CPU with its
engine's hooks, KVM with the four debug registers). An accelerator says what
it can do in a `DebugSupport`; what it stops on comes back as a `DebugTrap`
exit (vmm/exits.py).
"""

from __future__ import annotations

from typing import NamedTuple

# DebugPoint kinds: an instruction breakpoint, or a watchpoint on writes, reads or both.
BREAK, WRITE, READ, ACCESS = "break", "write", "read", "access"


class DebugPoint(NamedTuple):
    kind: str
    address: int  # guest-virtual
    length: int = 1


class GuestDebug(NamedTuple):
    step: bool = False  # stop after one instruction
    points: tuple[DebugPoint, ...] = ()
    # Addresses where the debugger wrote int3 into guest code (KVM): a #BP
    # there is the debugger's; any other #BP goes back to the guest.
    int3_at: frozenset[int] = frozenset()

    @property
    def active(self) -> bool:
        return self.step or bool(self.points) or bool(self.int3_at)


class DebugSupport(NamedTuple):
    # How many DebugPoints can be set at once (the debug registers); None: no limit.
    slots: int | None
    watch_kinds: frozenset[str]
    # Software breakpoints are int3 written into guest code (else they are DebugPoints too).
    int3: bool
    # One line for the user about what this host refuses, or "".
    notice: str = ""
