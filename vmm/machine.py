"""One virtual machine: what was built (vmm/builder.py), running it, and shutting it down.

`run()` starts the host console, the virtio I/O thread and one exit-loop
thread per vCPU (vmm/vcpu_thread.py), and waits for the stop; `shutdown()`
stops everything and releases host resources, whether or not the build
finished. vmm/session.py drives the whole life of one machine.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from boot.firmware import BootFailureWatch
from devices.board import Board
from devices.boot_timer import process_start_time
from vmm import exit_status
from vmm.accel import MachineIo
from vmm.bus import Bus
from vmm.config import MachineConfig
from vmm.console import OUTPUT_GRACE_SECONDS, Console
from vmm.lifecycle import StopController
from vmm.memory import GuestMemory
from vmm.stuck_vcpu import LOOK_INTERVAL, StuckVcpuWatch
from vmm.vcpu_thread import VcpuThread

if TYPE_CHECKING:  # imported by the builder only for a machine that has virtio devices
    from vmm.virtio_setup import VirtioDevices

log = logging.getLogger(__name__)

# How long shutdown waits for a kicked vCPU thread before giving up on it.
VCPU_JOIN_TIMEOUT = 5.0


class Machine:
    def __init__(self, config: MachineConfig, console: Console) -> None:
        config.validate()
        self.config = config
        self.console = console
        self.started = process_start_time()
        self.stop = StopController()
        self.io = MachineIo(pio=Bus("pio"), mmio=Bus("mmio"))
        self.threads: list[VcpuThread] = []
        self.memory: GuestMemory | None = None
        self.accel = None
        self.vm = None
        self.vcpus = []
        self.board: Board | None = None
        self.devices: dict[str, object] = {}  # name -> what its plug() returned (vmm/builder.py)
        self.virtio: VirtioDevices | None = None
        self.boot_failure: BootFailureWatch | None = None  # booting a disk: the firmware's serial output
        self.accel_name = "none"
        self.gdb = None  # vmm.gdb.server.GdbServer with --gdb
        self.resets = None  # vmm.guest_reset.GuestResets, made with guest memory (vmm/builder.py)
        self.stuck_watch = StuckVcpuWatch(self._notice)

    # -- running -------------------------------------------------------------

    def run(self) -> int:
        self.console.start(self.board.console_input)
        if self.virtio:
            self.virtio.start()
        if self.gdb is not None:
            self.gdb.start()
        for vcpu in self.vcpus:
            thread = VcpuThread(vcpu, self.io, self.stop, self.gdb.debugger if self.gdb else None,
                                triple_fault=self.resets.triple_fault)
            self.threads.append(thread)
            thread.start()
        self._wait_for_stop()
        if (self.boot_failure is not None and self.boot_failure.seen
                and self.stop.status in (exit_status.RESET, exit_status.TRIPLE_FAULT)):
            # The reset that follows the message (port 0xCF9; a triple fault is SeaBIOS's fallback).
            self.stop.status = exit_status.NO_BOOTABLE_DEVICE
            self.stop.reason = "the firmware found no bootable device"
        return self.stop.status

    def _wait_for_stop(self) -> None:
        """Until the machine stops or --timeout runs out; meanwhile each vCPU looks
        once a second whether it is stuck (vmm/stuck_vcpu.py)."""
        timeout = self.config.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = self.stuck_watch
        while True:
            wait = LOOK_INTERVAL if deadline is None else min(LOOK_INTERVAL, deadline - time.monotonic())
            if self.stop.wait(max(wait, 0.0)):
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.stop.request_stop(exit_status.TIMED_OUT, f"the guest was still running after --timeout "
                                                              f"{timeout:g} s; stopped it", by_host=True)
                return
            for thread in self.threads:
                thread.request_look(watch.look)

    def _notice(self, message: str) -> None:
        """One line while the guest runs: on stderr, or where the console sends notices."""
        self.console.notice(message)

    def shutdown(self) -> None:
        """Stop every vCPU thread and release host resources; safe to call more than once."""
        self.stop.request_stop(exit_status.INTERRUPTED, "stopped", by_host=True)
        # A guest that ended itself (power-off, its exit status, a reset) keeps its last output
        # until a slow reader takes it; a stop the host asked for does not wait for a reader.
        drain = not self.stop.by_host
        deadline = time.monotonic() + VCPU_JOIN_TIMEOUT
        for thread in self.threads:
            thread.join(min(OUTPUT_GRACE_SECONDS, max(0.0, deadline - time.monotonic())))
        if not drain and any(thread.is_alive() for thread in self.threads):
            # A vCPU may be blocked writing console output nobody reads (a full
            # pipe): drop the output so that it can see the stop.
            self.console.discard_output()
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not stop within %.0f s", thread.name, VCPU_JOIN_TIMEOUT)
        self.console.stop(drain=drain)
        if self.virtio is not None and not any(thread.is_alive() for thread in self.threads):
            self.virtio.close()  # flushes the disks
        if self.gdb is not None:
            self.gdb.close()
            self.gdb = None
        if any(thread.is_alive() for thread in self.threads):
            return  # a stuck thread may still use the VM and memory; the process exit frees them
        if self.stop.by_host and self.stop.status == exit_status.TIMED_OUT:  # not a guest's own 124
            for vcpu in self.vcpus:  # a guest that ran out of time: was it stuck somewhere?
                self.stuck_watch.look(vcpu)
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.accel is not None:
            self.accel.close()
            self.accel = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
