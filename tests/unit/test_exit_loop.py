"""The exit loop, driven by a scripted fake vCPU: no KVM needed.

Follows exits from `vcpu.run()` to the buses and checks what reaches the
devices, what goes back to the vCPU, and which exit status each stop gives.
"""

from __future__ import annotations

import pytest

from devices.testdev import ScratchDevice
from vmm import exit_status
from vmm.accel import MachineIo, Vcpu
from vmm.bus import Bus
from vmm.exits import (
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
)
from vmm.lifecycle import StopController
from vmm.vcpu_thread import VcpuThread


class ScriptedVcpu(Vcpu):
    def __init__(self, exits):
        self.index = 0
        self.exits = list(exits)
        self.answers: list[bytes] = []
        self.kicked = 0

    def run(self):
        return self.exits.pop(0)

    def complete_read(self, data):
        self.answers.append(data)

    def set_state(self, state):
        pass

    def kick(self):
        self.kicked += 1

    def registers(self):
        return {}

    def code_at_rip(self):
        return 0, b""

    def close(self):
        pass


class Recorder:
    def __init__(self, value=0):
        self.writes = []
        self.reads = []
        self.value = value

    def read(self, offset, size):
        self.reads.append((offset, size))
        return self.value

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def run_script(exits, io=None):
    io = io or MachineIo(Bus("pio"), Bus("mmio"))
    vcpu = ScriptedVcpu(exits)
    stop = StopController()
    stop.add_kicker(vcpu.kick)
    thread = VcpuThread(vcpu, io, stop)
    thread.run()  # in this thread: the loop returns once the machine stops
    return vcpu, stop, thread


def test_port_io_reaches_the_device_and_reads_are_answered():
    io = MachineIo(Bus("pio"), Bus("mmio"))
    device = Recorder(value=0xAB)
    io.pio.register(0x3F8, 8, device, "com1")
    vcpu, stop, thread = run_script([
        IoOut(0x3F9, 1, 1, b"\x07"),
        IoIn(0x3FD, 1, 1),
        IoOut(0x3F8, 1, 3, b"abc"),      # rep outsb: three writes
        IoIn(0x3F8, 1, 2),               # rep insb: two reads
        Interrupted(),
        Shutdown(),
    ], io)
    assert device.writes == [(1, 1, 7), (0, 1, ord("a")), (0, 1, ord("b")), (0, 1, ord("c"))]
    assert vcpu.answers == [b"\xab", b"\xab\xab"]
    assert stop.status == exit_status.TRIPLE_FAULT
    assert thread.exit_counts["IoOut"] == 2 and thread.exit_counts["Interrupted"] == 1


def test_mmio_of_each_size():
    io = MachineIo(Bus("pio"), Bus("mmio"))
    scratch = ScratchDevice()
    io.mmio.register(0xD000_0000, 0x1000, scratch, "scratch")
    vcpu, stop, _ = run_script([
        MmioWrite(0xD000_0000, b"\x11"),
        MmioWrite(0xD000_0008, (0x2233).to_bytes(2, "little")),
        MmioWrite(0xD000_0010, (0x44556677).to_bytes(4, "little")),
        MmioWrite(0xD000_0018, (0x8899AABBCCDDEEFF).to_bytes(8, "little")),
        MmioRead(0xD000_0018, 8),
        MmioRead(0xD000_001C, 4),
        MmioRead(0xE000_0000, 2),        # unclaimed: all ones
        Hlt(),
    ], io)
    assert vcpu.answers == [(0x8899AABBCCDDEEFF).to_bytes(8, "little"), bytes.fromhex("bbaa9988"), b"\xff\xff"]
    assert stop.status == exit_status.POWEROFF


@pytest.mark.parametrize(("exit", "status", "reason"), [
    (Hlt(), exit_status.POWEROFF, ""),
    (Shutdown(), exit_status.TRIPLE_FAULT, "triple-faulted"),
    (SystemEvent("shutdown"), exit_status.POWEROFF, ""),
    (SystemEvent("reset"), exit_status.RESET, "reset"),
    (SystemEvent("crash"), exit_status.GUEST_PANIC, "crash"),
    (EntryFailure(0x21, 0xFFF0), exit_status.ENTRY_FAILURE, "refused to enter the guest"),
    (EmulationFailure(1, 0x1234, b"\xcc\x90"), exit_status.EMULATION_FAILURE, "instruction bytes cc 90"),
])
def test_stop_exits(exit, status, reason):
    vcpu, stop, _ = run_script([exit])
    assert stop.status == status
    assert reason in stop.reason
    assert vcpu.kicked == 1  # every vCPU is kicked when the machine stops


def test_a_device_that_raises_stops_the_machine_with_an_error():
    class Broken:
        def read(self, offset, size):
            raise RuntimeError("device bug")

        def write(self, offset, size, value):
            raise RuntimeError("device bug")

    io = MachineIo(Bus("pio"), Bus("mmio"))
    io.pio.register(0x10, 1, Broken(), "broken")
    _, stop, _ = run_script([IoOut(0x10, 1, 1, b"\0")], io)
    assert stop.status == exit_status.ERROR
    assert "device bug" in stop.reason


def test_first_stop_request_wins():
    stop = StopController()
    stop.request_stop(7, "first")
    stop.request_stop(0, "second")
    assert (stop.status, stop.reason) == (7, "first")
    assert stop.wait(0)
