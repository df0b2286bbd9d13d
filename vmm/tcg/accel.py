"""The software-CPU accelerator: Unicorn (QEMU's TCG) behind pyvmm's accelerator interface."""

from __future__ import annotations

from vmm.accel import Accelerator, MachineIo, PlatformOptions
from vmm.memory import GuestMemory
from vmm.tcg.vm import TcgVirtualMachine


class TcgAccelerator(Accelerator):
    name = "tcg"

    def create_vm(self, memory: GuestMemory, io: MachineIo, platform: PlatformOptions) -> TcgVirtualMachine:
        return TcgVirtualMachine(memory, io, platform)

    def close(self) -> None:
        pass
