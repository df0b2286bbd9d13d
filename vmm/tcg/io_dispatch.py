"""The software CPU's port-I/O and MMIO hooks: guest accesses straight to the machine's buses.

One exit on the software CPU, end to end: guest code runs `out dx, al`
inside `emu_start` (vmm/tcg/vcpu.py); Unicorn calls `IoHooks.port_out`
below, on the vCPU's own thread, which hands the access to `Bus.write`
(vmm/bus.py), which calls the device's `write(offset, size, value)`. This
file and the bus are the whole path; nothing leaves emulation.

On KVM every access is an exit that the exit loop (vmm/vcpu_thread.py)
dispatches. Leaving `emu_start` for each access would cost about 7 us more
than the access itself, so these hooks dispatch directly. They count with
the exit loop's names (`IoOut`, `IoIn`, `MmioWrite`, `MmioRead`), per vCPU,
so that --stats reads the same on both accelerators.

An access that makes the machine stop (the debug-exit port, a power-off)
ends the vCPU's run on KVM at once. Here the rest of the translated block
still executes before the stop hook runs, so the port accesses it makes are
dropped, as if they had not happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vmm.accel import MachineIo
from vmm.tcg.engine import Engine
from vmm.tcg.scheduler import CpuScheduler
from vmm.tcg.unicorn_lib import uc_const, x86

if TYPE_CHECKING:
    from devices.interrupts import InterruptRouter


class IoHooks:
    """Installed once on the shared engine; each access goes to the vCPU that owns the CPU."""

    def __init__(self, scheduler: CpuScheduler, io: MachineIo, router: InterruptRouter | None,
                 timer_moved: Callable[[], None]) -> None:
        self.scheduler = scheduler
        self.pio = io.pio
        self.mmio = io.mmio
        # Only an access that moved a timer (PIT, port 0x61, a local APIC) needs the
        # slice's alarm re-armed (`timer_moved`): not the ~17,000 console writes of a boot.
        self.router = router
        self.timer_moved = timer_moved

    def install(self, engine: Engine, mmio_start: int, mmio_end: int) -> None:
        """Hook IN and OUT, and map [mmio_start, mmio_end) as MMIO. Unicorn's MMIO callbacks
        take at most 4 bytes, so an 8-byte access arrives as two, low half first."""
        engine.uc.hook_add(uc_const.UC_HOOK_INSN, self.port_out, None, 1, 0, x86.UC_X86_INS_OUT)
        engine.uc.hook_add(uc_const.UC_HOOK_INSN, self.port_in, None, 1, 0, x86.UC_X86_INS_IN)
        self.mmio_start = mmio_start
        engine.map_mmio(mmio_start, mmio_end - mmio_start, self.mmio_read, self.mmio_write)

    def port_out(self, uc, port: int, size: int, value: int, user_data) -> None:
        vcpu = self.scheduler.owner
        if vcpu.kick_pending:
            return
        vcpu.io_counts["IoOut"] += 1
        router = self.router
        if router is None:
            self.pio.write(port, size, value & ((1 << (8 * size)) - 1))
            return
        changes = router.deadline_changes
        self.pio.write(port, size, value & ((1 << (8 * size)) - 1))
        if router.deadline_changes != changes:
            self.timer_moved()

    def port_in(self, uc, port: int, size: int, user_data) -> int:
        vcpu = self.scheduler.owner
        if vcpu.kick_pending:
            return (1 << (8 * size)) - 1
        vcpu.io_counts["IoIn"] += 1
        return self.pio.read(port, size)

    # The MMIO callbacks get the offset into the window that `install` mapped.

    def mmio_read(self, uc, offset: int, size: int, user_data) -> int:
        self.scheduler.owner.io_counts["MmioRead"] += 1
        return self.mmio.read(self.mmio_start + offset, size)

    def mmio_write(self, uc, offset: int, size: int, value: int, user_data) -> None:
        self.scheduler.owner.io_counts["MmioWrite"] += 1
        router = self.router
        if router is None:
            self.mmio.write(self.mmio_start + offset, size, value)
            return
        changes = router.deadline_changes
        self.mmio.write(self.mmio_start + offset, size, value)
        if router.deadline_changes != changes:
            self.timer_moved()
