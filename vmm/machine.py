"""Building and running one virtual machine, in the order a real machine comes up:

    memory -> accelerator and VM -> buses and devices -> boot loader -> vCPUs -> run -> shutdown

`Machine.run()` returns the process exit status (vmm/exit_status.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter

from devices.base import NullIrqLine, SilentDevice
from devices.debug_exit import DebugExit
from devices.testdev import TEST_DEVICE_SIZE, ScratchDevice
from devices.uart import Uart16550
from vmm import exit_status, layout
from vmm.accel import MachineIo, PlatformOptions
from vmm.accel_select import open_accelerator
from vmm.bus import Bus
from vmm.config import MachineConfig
from vmm.cpu_state import CpuState
from vmm.errors import PyvmmError
from vmm.lifecycle import StopController
from vmm.memory import GuestMemory
from vmm.vcpu_thread import VcpuThread

log = logging.getLogger(__name__)

# How long shutdown waits for a kicked vCPU thread before giving up on it.
VCPU_JOIN_TIMEOUT = 5.0


def write_stdout(data: bytes) -> None:
    """Guest serial output: straight to fd 1, unbuffered, all of it."""
    view = memoryview(data)
    while view:
        written = os.write(1, view)
        view = view[written:]


class Machine:
    def __init__(self, config: MachineConfig, output=write_stdout) -> None:
        config.validate()
        self.config = config
        self.output = output
        self.started = time.monotonic()
        self.stop = StopController()
        self.io = MachineIo(pio=Bus("pio"), mmio=Bus("mmio"))
        self.threads: list[VcpuThread] = []
        self.memory = None
        self.accel = None
        self.vm = None
        self.vcpus = []

    # -- building ------------------------------------------------------------

    def build(self) -> None:
        config = self.config
        self.memory = GuestMemory(config.memory)
        self.accel = open_accelerator(config.accel, config.kvm_device)
        self.vm = self.accel.create_vm(
            self.memory, self.io, PlatformOptions(cpus=config.cpus, irqchip=False)
        )
        self._add_devices()
        boot_state = self._load_guest()
        for index in range(config.cpus):
            vcpu = self.vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            self.stop.add_kicker(vcpu.kick)
        self.vcpus[0].set_state(boot_state)

    def _irq(self, gsi: int):
        return NullIrqLine()  # flat machines have no interrupt controller

    def _add_devices(self) -> None:
        pio = self.io.pio
        self.uart = Uart16550(self._irq(layout.COM1_IRQ), self.output)
        pio.register(layout.COM1_PORT, 8, self.uart, "com1")
        pio.register(layout.DEBUG_EXIT_PORT, 1, DebugExit(self._debug_exit), "debug-exit")
        pio.register(layout.POST_CODE_PORT, 1, SilentDevice(), "post-code")
        if self.config.flat is not None:
            self.io.mmio.register(layout.TEST_DEVICE_BASE, TEST_DEVICE_SIZE, ScratchDevice(), "scratch")

    def _debug_exit(self, status: int) -> None:
        self.stop.request_stop(status, "")

    def _load_guest(self) -> CpuState:
        image = self.config.flat
        try:
            data = image.read_bytes()
        except OSError as err:
            raise PyvmmError(f"cannot read {image}: {err.strerror}") from None
        room = self.memory.size - layout.FLAT_LOAD_ADDRESS
        if len(data) > min(room, layout.MMIO_HOLE_START - layout.FLAT_LOAD_ADDRESS):
            raise PyvmmError(f"{image} ({len(data)} bytes) does not fit in guest memory above "
                             f"{layout.FLAT_LOAD_ADDRESS:#x}")
        self.memory.write(layout.FLAT_LOAD_ADDRESS, data)
        return CpuState.real_mode(layout.FLAT_ENTRY_CS, 0)

    # -- running -------------------------------------------------------------

    def run(self) -> int:
        for vcpu in self.vcpus:
            thread = VcpuThread(vcpu, self.io, self.stop)
            self.threads.append(thread)
            thread.start()
        self.stop.wait()
        return self.stop.status

    def shutdown(self) -> None:
        """Stop every vCPU thread and release host resources; safe to call more than once."""
        self.stop.request_stop(exit_status.INTERRUPTED, "stopped")
        deadline = time.monotonic() + VCPU_JOIN_TIMEOUT
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not stop within %.0f s", thread.name, VCPU_JOIN_TIMEOUT)
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.accel is not None:
            self.accel.close()
            self.accel = None
        if self.memory is not None and not any(t.is_alive() for t in self.threads):
            self.memory.close()

    # -- reporting -----------------------------------------------------------

    def stats_report(self) -> str:
        lines = [f"pyvmm stats: {time.monotonic() - self.started:.3f} s wall time"]
        exits = Counter()
        for thread in self.threads:
            exits.update(thread.exit_counts)
        lines.append("  exits: " + (", ".join(f"{name} {n}" for name, n in exits.most_common()) or "none"))
        for bus in (self.io.pio, self.io.mmio):
            for entry in bus.ranges:
                if entry.accesses:
                    lines.append(f"  {bus.name} {entry.name:<12} {entry.base:#x}+{entry.size:#x}: "
                                 f"{entry.accesses} accesses")
            if bus.unclaimed:
                shown = ", ".join(f"{addr:#x} ({n})" for addr, n in sorted(bus.unclaimed.items())[:16])
                lines.append(f"  {bus.name} unclaimed: {shown}")
        return "\n".join(lines)


_current: Machine | None = None


def current_machine() -> Machine | None:
    """The machine being run, for signal handlers."""
    return _current


def run_machine(config: MachineConfig) -> int:
    """Build, run and tear down one machine; returns the exit status."""
    global _current
    machine = _current = Machine(config)
    try:
        machine.build()
        status = machine.run()
        reason = machine.stop.reason
    finally:
        machine.shutdown()
        _current = None
    if reason:
        print(f"pyvmm: {reason}", file=sys.stderr)
    if config.stats:
        print(machine.stats_report(), file=sys.stderr)
    return status
