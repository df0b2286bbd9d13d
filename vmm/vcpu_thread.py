"""The exit loop: one host thread per vCPU, from `vcpu.run()` to the device model.

    exit = vcpu.run()                    # blocks in the guest (KVM_RUN, or a software-CPU slice)
    IoOut / IoIn     -> io.pio           # Bus.write / Bus.read -> device.write / device.read
    MmioWrite / Read -> io.mmio
    Interrupted      -> look at the stop flag, run again (or, with a debugger stopping the VM,
                        park: vmm/gdb/debugger.py)
    DebugTrap        -> the debugger
    everything else  -> stop the machine with the matching exit status

Reads are answered with `vcpu.complete_read(data)` before the next `run()`.

On KVM every port and MMIO access the kernel does not handle comes through
here: this file, vmm/kvm/vcpu.py (`KvmVcpu.run`) and vmm/bus.py are the
whole path. (Where the compiled exit loop was built, vmm/kvm/exit_loop.py,
KVM's port and MMIO exits go from C to the same buses and only the other
exits come here.) The software CPU never returns I/O exits: its engine's hooks call
the same buses from inside emulation, on this same thread
(vmm/tcg/io_dispatch.py -> vmm/bus.py), and `run()` returns only to stop or
to be interrupted."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from vmm import exit_status
from vmm.accel import MachineIo, Vcpu
from vmm.exits import (
    DebugTrap,
    EmulationFailure,
    EntryFailure,
    Hlt,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    UnknownExit,
)
from vmm.lifecycle import StopController

log = logging.getLogger(__name__)


def describe_emulation_failure(index: int, failure: EmulationFailure) -> str:
    where = f" at RIP {failure.rip:#x}" if failure.rip is not None else ""
    code = f", instruction bytes {failure.instruction.hex(' ')}" if failure.instruction else ""
    detail = f" ({failure.detail})" if failure.detail else ""
    return (f"vCPU {index}: the accelerator could not emulate a guest instruction{where}"
            f" (internal error, suberror {failure.suberror}{code}){detail}")


class VcpuThread(threading.Thread):
    def __init__(self, vcpu: Vcpu, io: MachineIo, stop: StopController, debugger=None,
                 triple_fault: Callable[[int], None] | None = None) -> None:
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.vcpu = vcpu
        self.io = io
        self.stop = stop
        self.debugger = debugger  # vmm.gdb.debugger.Debugger when --gdb was given
        # Called with the vCPU index (vmm/guest_reset.py decides the status).
        self.triple_fault = triple_fault or self._stop_for_triple_fault
        self.look: Callable[[Vcpu], None] | None = None  # set with request_look (vmm/stuck_vcpu.py)
        self._counts: Counter[type] = Counter()  # by exit class: no name lookup per exit

    def run(self) -> None:
        try:
            self._loop()
        except Exception as err:  # noqa: BLE001 - a vCPU thread must never die silently
            log.debug("vCPU %d failed", self.vcpu.index, exc_info=True)
            self.stop.request_stop(exit_status.ERROR, f"vCPU {self.vcpu.index}: {err}")
        finally:
            self.vcpu.thread_done()

    @property
    def exit_counts(self) -> Counter[str]:
        """Exits so far by kind ("IoOut", "Hlt", ...)."""
        return Counter({kind.__name__: count for kind, count in self._counts.items()})

    def _loop(self) -> None:
        # Every exit passes here: the methods it calls are looked up once.
        run, complete_read, stop, debugger = self.vcpu.run, self.vcpu.complete_read, self.stop, self.debugger
        pio_write, pio_read, mmio_write, mmio_read = (self.io.pio.write, self.io.pio.read,
                                                      self.io.mmio.write, self.io.mmio.read)
        counts = self._counts
        vcpu = self.vcpu
        while not stop.stopping:
            exit = run()
            kind = type(exit)
            counts[kind] += 1
            # The accesses' fields are unpacked (exits are NamedTuples): quicker than reading
            # each by name, and these are the exits that come by the thousand.
            if kind is IoOut:
                port, size, count, data = exit
                if count == 1:
                    pio_write(port, size, int.from_bytes(data, "little"))
                else:  # rep outs: one device access per item, as the hardware does
                    for start in range(0, size * count, size):
                        pio_write(port, size, int.from_bytes(data[start : start + size], "little"))
            elif kind is IoIn:
                port, size, count = exit
                complete_read(b"".join(pio_read(port, size).to_bytes(size, "little") for _ in range(count)))
            elif kind is MmioWrite:
                address, data = exit
                mmio_write(address, len(data), int.from_bytes(data, "little"))
            elif kind is MmioRead:
                address, size = exit
                complete_read(mmio_read(address, size).to_bytes(size, "little"))
            elif kind is Interrupted:
                look, self.look = self.look, None
                if look is not None:
                    look(vcpu)
                if debugger is not None:
                    debugger.interrupted(vcpu)
            elif kind is DebugTrap and debugger is not None:
                debugger.trapped(vcpu, exit)
            else:
                self._stop_for(exit)
                return

    def request_look(self, look: Callable[[Vcpu], None]) -> None:
        """From any thread: pause the vCPU and have it call look(vcpu) on its thread."""
        self.look = look
        self.vcpu.pause()

    def _stop_for_triple_fault(self, index: int) -> None:
        self.stop.request_stop(exit_status.TRIPLE_FAULT, f"vCPU {index}: the guest triple-faulted")

    def _stop_for(self, exit) -> None:
        index = self.vcpu.index
        match exit:
            case Hlt():
                self.stop.request_stop(exit_status.POWEROFF, "")
            case Shutdown():
                self.triple_fault(index)
            case SystemEvent(kind="shutdown"):
                self.stop.request_stop(exit_status.POWEROFF, "")
            case SystemEvent(kind="reset"):
                self.stop.request_stop(exit_status.RESET, "the guest asked for a reset")
            case SystemEvent(kind=kind):
                self.stop.request_stop(exit_status.GUEST_PANIC, f"the guest reported a {kind}")
            case EntryFailure(reason=reason, rip=rip):
                self.stop.request_stop(
                    exit_status.ENTRY_FAILURE,
                    f"vCPU {index}: the accelerator refused to enter the guest "
                    f"(hardware entry failure reason {reason:#x}, RIP {rip or 0:#x})")
            case EmulationFailure():
                self.stop.request_stop(exit_status.EMULATION_FAILURE, describe_emulation_failure(index, exit))
            case UnknownExit(reason=reason):
                self.stop.request_stop(exit_status.ERROR, f"vCPU {index}: unexpected exit reason {reason}")
