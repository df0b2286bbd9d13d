"""`KvmAccelerator`: the vmm.accel interface implemented on /dev/kvm.

`KvmVcpu.run` is the top of every VM exit: it enters KVM_RUN, and turns
what the kernel wrote into `kvm_run` into one of the exit values in
vmm/exits.py, which the exit loop (vmm/vcpu_thread.py) dispatches.
"""

from __future__ import annotations

import os
import signal
import struct
import threading

from devices import lapic as lapic_regs
from vmm.accel import Accelerator, MachineIo, PlatformOptions, Vcpu, VirtualMachine
from vmm.cpu_state import GPR_NAMES, CpuState, Segment
from vmm.errors import GuestMemoryError, PyvmmError
from vmm.exits import (
    EmulationFailure,
    EntryFailure,
    Exit,
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
from vmm.guest_debug import DebugSupport, GuestDebug
from vmm.kvm import debug as guest_debug
from vmm.kvm import quirks
from vmm.kvm import uapi as k
from vmm.kvm.cpuid import cpuid_for_vcpu
from vmm.kvm.fd import KvmSystem, VcpuFd, VmFd
from vmm.layout import (
    IOAPIC_PINS,
    KVM_IDENTITY_MAP_ADDRESS,
    KVM_TSS_ADDRESS,
    PIC_CASCADE_IRQ,
    TIMER_IOAPIC_PIN,
    isa_irq_to_ioapic_pin,
)
from vmm.memory import GuestMemory

# A kick is this signal sent to the vCPU's thread: its only job is to make a
# blocked KVM_RUN return EINTR. The handler must exist (an ignored signal
# would not interrupt the ioctl) and does nothing.
KICK_SIGNAL = signal.SIGUSR1

FPU_CONTROL_DEFAULT = 0x37F  # x87 after FNINIT: all exceptions masked, 64-bit precision
MXCSR_DEFAULT = 0x1F80  # SSE: all exceptions masked, round to nearest

# MSRs as firmware leaves them: fast string operations on, MTRRs enabled with
# write-back as the default memory type, the syscall MSRs cleared.
BOOT_MSRS = {
    0x174: 0, 0x175: 0, 0x176: 0,          # IA32_SYSENTER_CS/ESP/EIP
    0xC0000081: 0, 0xC0000082: 0,          # STAR, LSTAR
    0xC0000083: 0, 0xC0000084: 0,          # CSTAR, SYSCALL_MASK
    0xC0000102: 0,                         # KERNEL_GS_BASE
    0x10: 0,                               # TSC
    0x1A0: 1,                              # IA32_MISC_ENABLE: fast strings
    0x2FF: (1 << 11) | 6,                  # MTRRdefType: enabled, write-back
}

# kvm_run read as bytes on the mapped page, each exit with one unpack (cffi
# attribute reads cost more): exit_reason, and two members of the union at
# offset 32, io (direction, size, port, count, data_offset) and mmio
# (phys_addr, len, is_write; the data bytes in between, at MMIO_DATA).
_EXIT_REASON = struct.Struct("<I")
_EXIT_IO = struct.Struct("<BBHIQ")
_EXIT_MMIO = struct.Struct("<Q8xIB")
_UNION = 32
_MMIO_DATA = _UNION + 8
_IO, _IO_OUT, _MMIO = k.KVM_EXIT_IO, k.KVM_EXIT_IO_OUT, k.KVM_EXIT_MMIO

_SYSTEM_EVENTS = {
    k.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
    k.KVM_SYSTEM_EVENT_RESET: "reset",
    k.KVM_SYSTEM_EVENT_CRASH: "crash",
}


def _install_kick_handler() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    elif signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise PyvmmError("the KVM accelerator must be created on the main thread (it installs a signal handler)")


class KvmAccelerator(Accelerator):
    name = "kvm"

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.system = KvmSystem(path)
        _install_kick_handler()

    def can_run_linux(self) -> tuple[bool, str]:
        return quirks.can_run_linux()

    def linux_cmdline_additions(self) -> list[str]:
        return quirks.linux_cmdline_additions()

    def create_vm(self, memory: GuestMemory, io: MachineIo, platform: PlatformOptions) -> KvmVm:
        return KvmVm(self.system, memory, platform)

    def close(self) -> None:
        self.system.close()


def pc_gsi_routing() -> list[tuple[int, int, int]]:
    """GSI -> (irqchip, pin) as on a PC and as our MADT describes it.

    ISA IRQs 0-15 reach the 8259 pair (except the cascade input) and the I/O
    APIC, IRQ 0 on pin 2 (vmm/layout.py). KVM's default routing sends GSI 0 to
    pin 0, where Linux, reading the MADT, never looks.
    """
    routes = []
    for gsi in range(16):
        if gsi != PIC_CASCADE_IRQ:
            chip = k.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else k.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, chip, gsi % 8))
    for gsi in range(IOAPIC_PINS):
        if gsi != TIMER_IOAPIC_PIN:  # that pin is the timer's IRQ 0
            routes.append((gsi, k.KVM_IRQCHIP_IOAPIC, isa_irq_to_ioapic_pin(gsi)))
    return routes


def mask_8259s(vm_fd) -> None:
    """Mask every input of KVM's 8259 pair, as a PC's firmware leaves them.

    KVM creates the pair with nothing masked and vector base 0. A guest that
    never programs it (Linux on our hardware-reduced ACPI machine does not)
    would then get every ISA interrupt a second time through LINT0 (ExtINT,
    as firmware leaves it) as vector 0-15: the COM1 interrupt as #OF.
    A guest that wants the 8259s initialises them, which unmasks them.
    """
    for chip_id in (k.KVM_IRQCHIP_PIC_MASTER, k.KVM_IRQCHIP_PIC_SLAVE):
        chip = vm_fd.get_irqchip(chip_id)
        chip.chip.pic.imr = 0xFF
        vm_fd.set_irqchip(chip)


def _emulation_advice() -> str:
    """What to do about an instruction KVM could not emulate: a host quirk's fault, or the guest's."""
    if quirks.is_kvm_pvm():
        return ("this host's KVM cannot run this guest; boot it with --accel tcg (the software CPU) "
                "or on a host with hardware virtualisation")
    return ("the guest ran an instruction KVM does not emulate (often an access to an address "
            "no device or RAM answers); --accel tcg runs the same machine on the software CPU")


class KvmIrqLine:
    """An input pin of KVM's in-kernel 8259/IOAPIC pair."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi

    def set_level(self, high: bool) -> None:
        self._vm.irq_line(self.gsi, high)

    def pulse(self) -> None:
        self._vm.irq_line(self.gsi, True)
        self._vm.irq_line(self.gsi, False)


class KvmVm(VirtualMachine):
    def __init__(self, system: KvmSystem, memory: GuestMemory, platform: PlatformOptions) -> None:
        self.memory = memory
        self.platform = platform
        self.fd = system.create_vm()
        self._vcpus: list[KvmVcpu] = []
        self._eventfds: list[int] = []  # handed out by notifier() / irq_eventfd()
        try:
            max_vcpus = system.check_extension(k.KVM_CAP_MAX_VCPUS) or system.check_extension(k.KVM_CAP_NR_VCPUS)
            if platform.cpus > max_vcpus:
                raise PyvmmError(f"this KVM supports at most {max_vcpus} vCPUs, {platform.cpus} requested")
            # Intel VMX needs these two guest-physical areas for real-mode
            # emulation; they must not overlap RAM or devices (see layout.py).
            self.fd.set_tss_address(KVM_TSS_ADDRESS)
            self.fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            for slot, region in enumerate(memory.regions):
                host_address = int(k.ffi.cast("uintptr_t", k.ffi.from_buffer(region.mapping)))
                self.fd.set_user_memory_region(slot, region.guest_address, region.size, host_address)
            if platform.irqchip:
                self.fd.create_irqchip()
                mask_8259s(self.fd)
                self.fd.set_gsi_routing(pc_gsi_routing())
                self.fd.create_pit2()
            self._supported_cpuid = system.supported_cpuid()
            self._tsc_deadline = bool(platform.irqchip and system.check_extension(k.KVM_CAP_TSC_DEADLINE_TIMER))
        except BaseException:
            self.fd.close()
            raise

    def create_vcpu(self, index: int) -> KvmVcpu:
        block_irq = bool(self.fd.system.check_extension(k.KVM_CAP_SET_GUEST_DEBUG2) & k.KVM_GUESTDBG_BLOCKIRQ)
        vcpu = KvmVcpu(index, self.fd.create_vcpu(index), self.memory, step_blocks_irq=block_irq)
        self._vcpus.append(vcpu)
        # A guest that enables long mode itself needs CPUID set first, or
        # its wrmsr to EFER faults.
        edits = [*quirks.cpuid_edits(), *self.platform.cpu_features]
        vcpu.fd.set_cpuid(cpuid_for_vcpu(self._supported_cpuid, index, self.platform.cpus, edits,
                                         tsc_deadline=self._tsc_deadline))
        if self.platform.irqchip:
            vcpu.set_firmware_state()
        return vcpu

    def debug_support(self) -> DebugSupport | None:
        return guest_debug.debug_support(self.fd.system)

    def irq_line(self, gsi: int) -> KvmIrqLine:
        if not self.platform.irqchip:
            raise PyvmmError("this machine has no interrupt controller")
        return KvmIrqLine(self.fd, gsi)

    def notifier(self, address: int, size: int, datamatch: int) -> int | None:
        if not self.fd.system.check_extension(k.KVM_CAP_IOEVENTFD):
            return None
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.fd.ioeventfd(eventfd, address, size, datamatch=datamatch)
        except PyvmmError:
            os.close(eventfd)
            return None
        self._eventfds.append(eventfd)
        return eventfd

    def irq_eventfd(self, gsi: int) -> int | None:
        if not (self.platform.irqchip and self.fd.system.check_extension(k.KVM_CAP_IRQFD)):
            return None
        # No resample eventfd: a level-triggered irqfd can only be lowered by
        # the guest's EOI, and kvm_pvm signals the resample before the guest
        # has even run its handler (see devices/virtio/mmio.py).
        trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.fd.irqfd(trigger, gsi)
        except PyvmmError:
            os.close(trigger)
            return None
        self._eventfds.append(trigger)
        return trigger

    def close(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        self.fd.close()
        for eventfd in self._eventfds:  # KVM dropped its references with the VM fd
            os.close(eventfd)
        self._eventfds.clear()


class KvmVcpu(Vcpu):
    def __init__(self, index: int, fd: VcpuFd, memory: GuestMemory, step_blocks_irq: bool = False) -> None:
        self.index = index
        self.fd = fd
        self.memory = memory
        self._run = fd.kvm_run
        self._page = fd.run_page
        self._thread_ident: int | None = None
        self._thread_lock = threading.Lock()  # a kick never signals a thread that has ended
        self._pending_read: tuple[int, int] | None = None  # (offset into kvm_run page, length)
        self._debug = GuestDebug()  # what the gdb stub asked for (vmm/kvm/debug.py)
        self._step_blocks_irq = step_blocks_irq

    # -- state ---------------------------------------------------------------

    def set_state(self, state: CpuState) -> None:
        sregs = self.fd.get_sregs()
        for name, segment in state.segments.items():
            _store_segment(getattr(sregs, name), segment)
        sregs.gdt.base, sregs.gdt.limit = state.gdt
        sregs.idt.base, sregs.idt.limit = state.idt
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
        self.fd.set_sregs(sregs)
        regs = k.ffi.new("struct kvm_regs *")
        for name in (*GPR_NAMES, "rip", "rflags"):
            setattr(regs, name, state.reg(name))
        self.fd.set_regs(regs)

    def set_firmware_state(self) -> None:
        """What a PC's firmware leaves behind for an OS: FPU defaults, MSRs, LAPIC LINT pins."""
        fpu = k.ffi.new("struct kvm_fpu *")
        fpu.fcw = FPU_CONTROL_DEFAULT
        fpu.mxcsr = MXCSR_DEFAULT
        self.fd.set_fpu(fpu)
        self.fd.set_msrs(BOOT_MSRS)
        # Through-the-8259 interrupts arrive on LINT0 (ExtINT), NMIs on LINT1,
        # as the MP specification's virtual wire mode has it.
        lapic = self.fd.get_lapic()
        for register, mode in ((lapic_regs.REG_LVT_LINT0, lapic_regs.EXTINT), (lapic_regs.REG_LVT_LINT1, lapic_regs.NMI)):
            value = int.from_bytes(k.ffi.buffer(lapic.regs)[register : register + 4], "little")
            value = (value & ~0x700 & ~lapic_regs.LVT_MASKED) | (mode << 8)
            k.ffi.buffer(lapic.regs)[register : register + 4] = value.to_bytes(4, "little")
        self.fd.set_lapic(lapic)

    def registers(self) -> dict[str, int]:
        regs = self.fd.get_regs()
        sregs = self.fd.get_sregs()
        values = {name: getattr(regs, name) for name in (*GPR_NAMES, "rip", "rflags")}
        values.update(cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer,
                      cs=sregs.cs.selector, cs_base=sregs.cs.base)
        return values

    def instruction_bytes(self, length: int = 15) -> tuple[int | None, bytes]:
        """RIP and the bytes at it, read through the guest's own translation; b"" if unreadable."""
        try:
            regs = self.registers()
        except PyvmmError:
            return None, b""
        return regs["rip"], self._code_at(regs["cs_base"] + regs["rip"], length)

    def code_at_rip(self) -> tuple[int, bytes]:
        regs = self.registers()
        linear = regs["cs_base"] + regs["rip"]
        return linear, self._code_at(linear, 15)

    def _code_at(self, linear: int, length: int) -> bytes:
        try:
            physical = self.fd.translate(linear)
        except PyvmmError:
            physical = None
        if physical is None:
            return b""
        # Stop at the page end: the next page may map elsewhere.
        length = min(length, 4096 - (physical & 0xFFF))
        try:
            return self.memory.read(physical, length)
        except GuestMemoryError:
            return b""

    # -- running -------------------------------------------------------------

    def run(self) -> Exit:
        if self._thread_ident is None:
            with self._thread_lock:
                self._thread_ident = threading.get_ident()
        if not self.fd.run():
            self._run.immediate_exit = 0
            return Interrupted()
        page = self._page
        reason = _EXIT_REASON.unpack_from(page, 8)[0]
        if reason == _IO:
            direction, size, port, count, offset = _EXIT_IO.unpack_from(page, _UNION)
            if direction == _IO_OUT:
                return IoOut(port, size, count, bytes(page[offset : offset + size * count]))
            self._pending_read = (offset, size * count)
            return IoIn(port, size, count)
        if reason == _MMIO:
            address, length, is_write = _EXIT_MMIO.unpack_from(page, _UNION)
            length = min(length, 8)  # the kernel never says more; the data area holds 8
            if is_write:
                return MmioWrite(address, bytes(page[_MMIO_DATA : _MMIO_DATA + length]))
            self._pending_read = (_MMIO_DATA, length)
            return MmioRead(address, length)
        run = self._run
        if reason == k.KVM_EXIT_HLT:
            return Hlt()
        if reason == k.KVM_EXIT_INTR:
            return Interrupted()
        if reason == k.KVM_EXIT_SHUTDOWN:
            return Shutdown()
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            return SystemEvent(_SYSTEM_EVENTS.get(run.system_event.type, f"type {run.system_event.type}"))
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            return EntryFailure(run.fail_entry.hardware_entry_failure_reason, self.registers()["rip"])
        if reason == k.KVM_EXIT_DEBUG:
            return self._debug_exit()
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            rip, instruction = self.instruction_bytes()
            return EmulationFailure(run.internal.suberror, rip, instruction, detail=_emulation_advice())
        return UnknownExit(reason)

    # -- the gdb stub ---------------------------------------------------------

    def set_guest_debug(self, debug: GuestDebug) -> None:
        if debug != self._debug:
            self.fd.set_guest_debug(*guest_debug.guest_debug_request(debug, self._step_blocks_irq))
            self._debug = debug

    def _debug_exit(self) -> Exit:
        trap = guest_debug.trap_from_exit(self._run, self._debug)
        if trap is not None:
            return trap
        # The guest's own #BP or #DB while debugging is on: hand it back.
        control, debugreg = guest_debug.guest_debug_request(self._debug, self._step_blocks_irq)
        self.fd.set_guest_debug(control | guest_debug.reinjection(self._run), debugreg)
        return Interrupted()

    def debug_registers(self) -> dict[str, int | None]:
        return guest_debug.read_debug_registers(self.fd)

    def write_debug_registers(self, values: dict[str, int]) -> None:
        guest_debug.write_debug_registers(self.fd, values)

    def complete_read(self, data: bytes) -> None:
        offset, length = self._pending_read
        self._page[offset : offset + length] = data[:length]
        self._pending_read = None

    def kick(self) -> None:
        self._run.immediate_exit = 1
        with self._thread_lock:
            # Signalling a thread that has ended is undefined (its id may be reused).
            if self._thread_ident is not None:
                signal.pthread_kill(self._thread_ident, KICK_SIGNAL)

    def thread_done(self) -> None:
        with self._thread_lock:
            self._thread_ident = None

    def close(self) -> None:
        self._run = None
        self._page = None
        self.fd.close()


def _store_segment(target, segment: Segment) -> None:
    target.base = segment.base
    target.limit = segment.limit
    target.selector = segment.selector
    target.type = segment.type
    target.present = int(segment.present)
    target.dpl = segment.dpl
    target.db = int(segment.db)
    target.s = int(segment.s)
    target.l = int(segment.l)
    target.g = int(segment.g)
    target.avl = int(segment.avl)
    target.unusable = int(segment.unusable)
