"""The debugger's all-stop control and KVM's debug encoding, with scripted vCPUs (no VM, no KVM).

These cover what the development hosts cannot run: KVM software breakpoints
(int3 written into guest code), which kvm_pvm cannot execute in ring 0.
"""

from __future__ import annotations

import os
import select
import threading
from types import SimpleNamespace

import pytest

from vmm.exits import DebugTrap
from vmm.gdb.debugger import Debugger
from vmm.gdb.target import MemoryFault, Refused
from vmm.guest_debug import ACCESS, BREAK, WRITE, DebugPoint, DebugSupport, GuestDebug
from vmm.kvm import debug as kvm_debug
from vmm.kvm import uapi as k
from vmm.lifecycle import StopController
from vmm.memory import GuestMemory

CODE = 0x1000


class ScriptedVcpu:
    """A vCPU thread that 'runs' until kicked, then reports Interrupted to the debugger, like VcpuThread."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.kicked = threading.Event()
        self.debug = GuestDebug()
        self.regs = {"rip": CODE, "cr0": 0, "cr3": 0, "cr4": 0, "efer": 0, "rax": index}
        self.threads = set()

    def kick(self) -> None:
        self.kicked.set()

    def set_guest_debug(self, debug: GuestDebug) -> None:
        self.threads.add(threading.get_ident())
        self.debug = debug

    def debug_registers(self):
        self.threads.add(threading.get_ident())
        return dict(self.regs)

    def write_debug_registers(self, values):
        self.regs.update(values)

    def loop(self, debugger: Debugger, stop: StopController) -> None:
        while not stop.stopping:
            if self.kicked.wait(0.05):
                self.kicked.clear()
                debugger.interrupted(self)


@pytest.fixture
def machine():
    memory = GuestMemory(1 << 20)
    memory.write(CODE, b"\x90\x90\xc3")
    stop = StopController()
    vcpus = [ScriptedVcpu(0), ScriptedVcpu(1)]
    vm = SimpleNamespace(debug_support=lambda: DebugSupport(slots=4, watch_kinds=frozenset({WRITE, ACCESS}),
                                                            int3=True))
    debugger = Debugger(vm, vcpus, memory, stop, paused=True)
    threads = [threading.Thread(target=v.loop, args=(debugger, stop), daemon=True) for v in vcpus]
    for thread in threads:
        thread.start()
    yield SimpleNamespace(debugger=debugger, vcpus=vcpus, memory=memory, stop=stop, threads=threads)
    stop.request_stop(0)
    for thread in threads:
        thread.join(5)
    debugger.close()
    memory.close()


def test_paused_at_start_then_software_breakpoints_are_int3_only_while_running(machine):
    debugger, memory, vcpus = machine.debugger, machine.memory, machine.vcpus
    assert debugger.stop().reason == "stopped"
    assert debugger.add_point("software", CODE + 1, 1)
    debugger.resume({1: "c", 2: "c"})
    assert memory.read(CODE, 3) == b"\x90\xcc\xc3"  # inserted while the guest runs
    assert vcpus[0].debug == GuestDebug(int3_at=frozenset({CODE + 1}))  # no debug register used
    # vCPU 2 hits it: the stop names it as gdb's software breakpoint, and the
    # original byte is back before gdb reads memory.
    trap = threading.Thread(target=debugger.trapped, args=(vcpus[1], DebugTrap("int3", CODE + 1)))
    trap.start()
    event = wait_for_stop(debugger)
    assert (event.thread, event.reason, event.address) == (2, "swbreak", CODE + 1)
    assert memory.read(CODE, 3) == b"\x90\x90\xc3"
    assert debugger.read_memory(1, CODE, 3) == b"\x90\x90\xc3"
    machine.stop.request_stop(0)
    trap.join(5)


def wait_for_stop(debugger):
    """As the gdb thread does: wait on wake_fd until a stop is ready."""
    while True:
        ready, _, _ = select.select([debugger.wake_fd], [], [], 30)
        assert ready, "no stop reported"
        os.eventfd_read(debugger.wake_fd)
        event = debugger.take_stop()
        if event is not None:
            return event


def test_a_trap_stops_every_vcpu_and_is_reported_once(machine):
    debugger, vcpus = machine.debugger, machine.vcpus
    debugger.stop()
    assert debugger.add_point("hardware", CODE, 1)
    debugger.resume({1: "c", 2: "s"})
    assert vcpus[1].debug == GuestDebug(step=True, points=(DebugPoint(BREAK, CODE),))
    trap = threading.Thread(target=debugger.trapped, args=(vcpus[1], DebugTrap("step", CODE + 1)))
    trap.start()
    event = wait_for_stop(debugger)
    assert event.thread == 2 and event.reason == "step"
    assert debugger.take_stop() is None  # reported once
    assert debugger.registers(1)["rax"] == 0
    # Register reads ran on the vCPUs' own (scripted) threads, never on the caller's.
    assert threading.get_ident() not in vcpus[0].threads | vcpus[1].threads
    machine.stop.request_stop(0)
    trap.join(5)
    assert not trap.is_alive()


def test_debug_registers_run_out_and_memory_faults(machine):
    debugger = machine.debugger
    debugger.stop()
    for address in range(4):
        assert debugger.add_point("hardware", CODE + address, 1)
    with pytest.raises(Refused, match="4 debug registers"):
        debugger.add_point("write", 0x2000, 4)
    assert debugger.add_point("software", CODE + 8, 1)  # int3 takes no register
    with pytest.raises(MemoryFault):
        debugger.add_point("software", 1 << 30, 1)  # int3 needs RAM under it
    assert not debugger.add_point("read", 0x2000, 4)  # not offered by this accelerator
    debugger.remove_point("hardware", CODE, 1)
    with pytest.raises(Refused, match="aligned"):
        debugger.add_point("write", 0x2001, 4)
    with pytest.raises(MemoryFault):
        debugger.read_memory(1, 1 << 30, 4)  # beyond RAM
    assert debugger.read_memory(1, (1 << 20) - 2, 8) == b"\0\0"  # up to the end of RAM


# -- KVM_SET_GUEST_DEBUG and KVM_EXIT_DEBUG ----------------------------------------------------


def test_debug_registers_are_encoded_as_the_sdm_says():
    debug = GuestDebug(step=True, points=(DebugPoint(BREAK, 0x1000), DebugPoint(WRITE, 0x2000, 4),
                                          DebugPoint(ACCESS, 0x3000, 8)))
    control, regs = kvm_debug.guest_debug_request(debug, block_irq=True)
    assert control == (k.KVM_GUESTDBG_ENABLE | k.KVM_GUESTDBG_SINGLESTEP | k.KVM_GUESTDBG_BLOCKIRQ
                       | k.KVM_GUESTDBG_USE_HW_BP)
    assert regs[:4] == [0x1000, 0x2000, 0x3000, 0]
    # DR7: G0 G1 G2; slot 0 execute/1 byte, slot 1 write/4 bytes (0b11 << 2), slot 2 access/8 bytes (0b10 << 2 | 0b11)
    assert regs[7] == 0x600 | 0b101010 | (0b1101 << 20) | (0b1011 << 24)
    assert kvm_debug.guest_debug_request(GuestDebug(), block_irq=True) == (0, [0] * 8)
    control, _ = kvm_debug.guest_debug_request(GuestDebug(int3_at=frozenset({5})), block_irq=False)
    assert control == k.KVM_GUESTDBG_ENABLE | k.KVM_GUESTDBG_USE_SW_BP


def _exit(exception: int, pc: int = 0, dr6: int = 0):
    return SimpleNamespace(debug=SimpleNamespace(exception=exception, pc=pc, dr6=dr6, dr7=0))


def test_debug_exits_are_decoded_and_the_guests_own_go_back():
    assert k.KVM_EXIT_DEBUG == 4  # linux/kvm.h
    debug = GuestDebug(step=True, points=(DebugPoint(BREAK, 0x1000), DebugPoint(WRITE, 0x2000, 4)),
                       int3_at=frozenset({0x5000}))
    assert kvm_debug.trap_from_exit(_exit(1, 0x1234, 0x4000), debug) == DebugTrap("step", 0x1234)
    assert kvm_debug.trap_from_exit(_exit(1, 0x1000, 0x1), debug) == DebugTrap(BREAK, 0x1000)
    assert kvm_debug.trap_from_exit(_exit(1, 0x1200, 0x2), debug) == DebugTrap(WRITE, 0x2000)
    assert kvm_debug.trap_from_exit(_exit(3, 0x5000), debug) == DebugTrap("int3", 0x5000)
    assert kvm_debug.trap_from_exit(_exit(3, 0x6000), debug) is None  # the guest's own int3
    assert kvm_debug.reinjection(_exit(3)) == k.KVM_GUESTDBG_INJECT_BP
    assert kvm_debug.trap_from_exit(_exit(1, 0, 0x8), debug) is None  # DR3: the guest's own
    assert kvm_debug.reinjection(_exit(1)) == k.KVM_GUESTDBG_INJECT_DB
