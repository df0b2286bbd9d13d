"""A guest reset ends the VM: with the reboot status, or the panic status when it follows a panic.

Every way a PC guest resets reaches `GuestResets.reset`: the ACPI reset
register, the i8042's reset pulse, port 0x92's fast reset, the reset control
register at 0xcf9, and a jump to the reset vector, where the reset stub
(boot/reset_stub.py) writes 0xcf9. A triple fault keeps its own status
(vmm/exit_status.py): on a PC it resets too, but it is also how a kernel
crashes before it can print anything, which a developer must not mistake
for an orderly reboot.

pyvmm does not restart a guest: a reset ends the VM. When the kernel's
command line makes a panic end in a warm reset (boot/reboot_params.py), the
BIOS warm-boot flag tells a panic from a reboot.
"""

from __future__ import annotations

from boot.reboot_params import BIOS_RESET_FLAG_ADDRESS, WARM_RESET_FLAG
from vmm import exit_status
from vmm.errors import GuestMemoryError
from vmm.lifecycle import StopController
from vmm.memory import GuestMemory


class GuestResets:
    def __init__(self, stop: StopController, memory: GuestMemory, warm_reset_means_panic: bool = False) -> None:
        self._stop = stop
        self._memory = memory
        self.warm_reset_means_panic = warm_reset_means_panic

    def _panicked(self) -> bool:
        if not self.warm_reset_means_panic:
            return False
        try:
            return self._memory.read_u16(BIOS_RESET_FLAG_ADDRESS) == WARM_RESET_FLAG
        except GuestMemoryError:  # memory already released: the machine is stopping anyway
            return False

    def reset(self, how: str) -> None:
        if self._panicked():
            self._stop.request_stop(exit_status.GUEST_PANIC,
                                    f"the guest kernel panicked (and reset the machine through {how})")
        else:
            self._stop.request_stop(exit_status.RESET, f"the guest asked for a reset (through {how})")

    def triple_fault(self, vcpu_index: int) -> None:
        if self._panicked():
            self._stop.request_stop(exit_status.GUEST_PANIC,
                                    f"the guest kernel panicked (and vCPU {vcpu_index} triple-faulted)")
        else:
            self._stop.request_stop(exit_status.TRIPLE_FAULT, f"vCPU {vcpu_index}: the guest triple-faulted")
