"""Noticing a vCPU stuck where no working guest runs: at the reset vector, or in an all-zero page.

A guest that jumps into memory nobody wrote executes `00 00` (`add [rax], al`)
forever, and one that jumps to the reset vector of a machine with no firmware
there spins too; neither makes a VM exit, so without a look pyvmm would just
burn a CPU in silence. The machine asks each vCPU thread to look once a
second (vmm/machine.py): the vCPU is paused (one exit on KVM; on the
software CPU, at the end of its current slice), reads the code at its RIP,
and says once on stderr where it is stuck. Nothing is added to the path of
a running guest.
"""

from __future__ import annotations

from collections.abc import Callable

from vmm.layout import REAL_MODE_RESET_VECTOR

LOOK_INTERVAL = 1.0  # seconds between looks
ZERO_CODE_RUN = 8  # this many zero bytes at RIP: no compiler emits that as code


def stuck_at(linear_rip: int, code: bytes) -> str | None:
    """Where a vCPU with this next instruction is stuck, in words, or None if it looks fine.

    Only F000:FFF0, where real-mode code jumps to reset, counts as the reset
    vector: 0xFFFFFFF0 is where every vCPU sits before it is started (an AP
    waiting for its SIPI) and where firmware starts.
    """
    if linear_rip == REAL_MODE_RESET_VECTOR:
        return "spinning at the reset vector"
    if len(code) >= ZERO_CODE_RUN and not any(code[:ZERO_CODE_RUN]):
        return "executing an all-zero page"
    return None


class StuckVcpuWatch:
    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report
        self.reported: set[int] = set()  # vCPU indexes already reported: once each

    def look(self, vcpu) -> None:
        """On the vCPU's own thread, between runs."""
        if vcpu.index in self.reported:
            return
        linear_rip, code = vcpu.code_at_rip()
        where = stuck_at(linear_rip, code)
        if where is not None:
            self.reported.add(vcpu.index)
            self._report(f"vCPU {vcpu.index} is {where} (RIP {linear_rip:#x}): the guest looks stuck")
