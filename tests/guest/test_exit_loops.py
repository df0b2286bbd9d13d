"""Both KVM exit loops (vmm/kvm/exit_loop.py), in this process, with devices of the test's own:
string I/O whose every item is a device access, and a device that raises.

(tests/guest/test_flat_guests.py runs whole guests through both loops with `pyvmm boot`.)
"""

from __future__ import annotations

import pytest

from tests.guest.conftest import use_kvm_exit_loop
from vmm import exit_status
from vmm.accel import MachineIo, PlatformOptions
from vmm.bus import Bus
from vmm.cpu_state import CpuState
from vmm.kvm.exit_loop import LOOP_ENV, compiled_loop_built
from vmm.lifecycle import StopController
from vmm.memory import GuestMemory
from vmm.vcpu_thread import VcpuThread

LOAD_ADDRESS = 0x10000  # real mode, CS = 0x1000

# mov %cs,%ax; mov %ax,%ds; mov %ax,%es; cld
# mov $0x200,%di; mov $3,%cx; mov $0x60,%dx; rep insw    (three reads of port 0x60 into ds:0x200)
# mov $0x200,%si; mov $3,%cx; mov $0x61,%dx; rep outsw   (the three words out to port 0x61)
# hlt
STRING_IO = bytes.fromhex("8cc8 8ed8 8ec0 fc"
                          "bf0002 b90300 ba6000 f36d"
                          "be0002 b90300 ba6100 f36f"
                          "f4")
OUT_0x80 = bytes.fromhex("e680 f4")  # out %al,$0x80; hlt


class Ports:
    """Port 0x60 reads 0x1111, 0x2222, ...; port 0x61 records what is written."""

    def __init__(self) -> None:
        self.reads = 0
        self.written: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return 0x1111 * self.reads

    def write(self, offset: int, size: int, value: int) -> None:
        self.written.append((size, value))


class Raises:
    def read(self, offset: int, size: int) -> int:
        raise RuntimeError("the device broke")

    def write(self, offset: int, size: int, value: int) -> None:
        raise RuntimeError("the device broke")


@pytest.fixture(params=["compiled", "python"])
def loop(request, monkeypatch) -> str:
    use_kvm_exit_loop(request.param, monkeypatch)
    return request.param


def run_guest(code: bytes, port: int, size: int, device) -> StopController:
    """Run `code` on one vCPU (no interrupt controller: its HLT ends the run) until it stops."""
    from vmm.kvm.accel import KvmAccelerator

    accel = KvmAccelerator()
    memory = GuestMemory(2 << 20)
    io = MachineIo(pio=Bus("pio"), mmio=Bus("mmio"))
    io.pio.register(port, size, device, "test ports")
    vm = accel.create_vm(memory, io, PlatformOptions())
    try:
        memory.write(LOAD_ADDRESS, code)
        vcpu = vm.create_vcpu(0)
        vcpu.set_state(CpuState.real_mode(LOAD_ADDRESS >> 4, 0))
        stop = StopController()
        VcpuThread(vcpu, io, stop).run()  # on this thread, until the machine stops
        return stop
    finally:
        vm.close()
        accel.close()
        memory.close()


def test_string_io_is_one_device_access_per_item(loop):
    ports = Ports()
    stop = run_guest(STRING_IO, 0x60, 2, ports)
    assert (stop.status, stop.reason) == (exit_status.POWEROFF, "")
    assert ports.reads == 3
    assert ports.written == [(2, 0x1111), (2, 0x2222), (2, 0x3333)]


def test_a_device_that_raises_stops_the_machine_with_its_error(loop):
    stop = run_guest(OUT_0x80, 0x80, 1, Raises())
    assert stop.status == exit_status.ERROR
    assert stop.reason == "vCPU 0: the device broke"


def test_a_module_built_from_another_exit_loop_c_is_not_used(monkeypatch):
    from vmm.kvm import exit_loop

    if not compiled_loop_built():
        pytest.skip("the compiled KVM exit loop is not built (make install, with gcc and python3-dev)")
    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert exit_loop.use_compiled_loop()
    monkeypatch.setattr(exit_loop, "source_digest", lambda: exit_loop.lib.EXIT_LOOP_DIGEST ^ 1)
    assert not exit_loop.use_compiled_loop()
