"""The software-CPU accelerator: Unicorn (QEMU's TCG) behind pyvmm's accelerator interface."""

from __future__ import annotations

from vmm.accel import Accelerator, MachineIo, PlatformOptions
from vmm.memory import GuestMemory
from vmm.tcg.vm import TcgVirtualMachine


class TcgAccelerator(Accelerator):
    name = "tcg"

    def linux_cmdline_additions(self) -> list[str]:
        # The software CPU executes the guest in order, without speculation, so
        # none of the hardware flaws Linux mitigates (Meltdown, Spectre, ...)
        # exist in it. The CPU model it shows is an Intel one, though, and for
        # that Linux turns them all on: page-table isolation switches CR3 on
        # every kernel entry and exit, and each switch empties the emulated
        # TLB; return thunks and retpolines turn direct returns into indirect
        # jumps the translator must look up. Off, a Linux guest's fixed job
        # takes about a sixth less CPU time (bench/bench_tcg_stress.py).
        return ["mitigations=off"]

    def create_vm(self, memory: GuestMemory, io: MachineIo, platform: PlatformOptions) -> TcgVirtualMachine:
        return TcgVirtualMachine(memory, io, platform)

    def close(self) -> None:
        pass
