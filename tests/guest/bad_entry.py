"""`python -m tests.guest.bad_entry IMAGE`: `pyvmm boot --flat IMAGE --accel kvm`, but with a
boot vCPU state that hardware refuses to enter.

The state is long mode with a code segment that is both 64-bit and 32-bit
(CS.L and CS.D set). The VM-entry checks of AMD SVM (VMRUN's consistency
checks, APM vol. 2 15.5.1) and Intel VMX (SDM vol. 3 26.3.1.2) both reject
it, and KVM does not check it in KVM_SET_SREGS, so KVM_RUN returns
KVM_EXIT_FAIL_ENTRY. No guest can get there itself (loading such a CS
faults), so this helper sets it from the VMM side, through pyvmm's own
machine, and the CLI reports the failure as it would any other.
"""

from __future__ import annotations

import sys

from vmm import builder
from vmm import cpu_state as cs
from vmm.cpu_state import CpuState, Segment
from vmm.machine import Machine

PAGE_TABLES = 0x9000  # any page-aligned RAM address: the entry fails before a page walk


def refused_state() -> CpuState:
    code = Segment(selector=0x8, base=0, limit=0xFFFFFFFF, type=0xB, l=True, db=True, g=True)
    segments = {name: Segment.flat_data(0x10) for name in ("ds", "es", "fs", "gs", "ss")}
    segments.update(cs=code, tr=Segment.tss(), ldt=Segment.ldt())
    return CpuState(regs={"rip": 0x10000, "rflags": cs.RFLAGS_RESERVED}, segments=segments,
                    cr0=cs.CR0_PE | cs.CR0_ET | cs.CR0_NE | cs.CR0_PG, cr3=PAGE_TABLES, cr4=cs.CR4_PAE,
                    efer=cs.EFER_LME | cs.EFER_LMA)


def main() -> None:
    build = builder.build

    def build_then_spoil(machine: Machine) -> None:
        build(machine)
        machine.vcpus[0].set_state(refused_state())

    builder.build = build_then_spoil
    sys.argv = ["pyvmm", "boot", "--flat", sys.argv[1], "--accel", "kvm"]
    from vmm.cli import main as pyvmm

    pyvmm()


if __name__ == "__main__":
    main()
