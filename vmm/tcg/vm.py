"""A software-CPU virtual machine: guest RAM and MMIO mapped into one Unicorn engine.

Guest RAM is mapped with `mem_map_ptr` onto GuestMemory's own host mappings,
so devices and loaders see the guest's writes and the guest sees theirs. The
32-bit MMIO hole (and any gap between the end of low RAM and the hole) is an
MMIO region whose accesses go to the machine's MMIO bus (vmm/tcg/io_dispatch.py),
so devices registered on the bus after the VM was created are reachable too;
what no device claims reads as all ones, as on KVM. (A bounded memory hook
would see 8-byte accesses whole, but slows every guest load and store by
about 30%.)

All hooks are installed once, on the shared engine, and forwarded to the vCPU
that owns the CPU (`scheduler.owner`, vmm/tcg/scheduler.py), on that vCPU's own
thread.
"""

from __future__ import annotations

import logging

from devices.interrupts import InterruptRouter
from vmm.accel import MachineIo, PlatformOptions, VirtualMachine
from vmm.bus import IrqLine, NullIrqLine
from vmm.guest_debug import DebugSupport
from vmm.layout import MMIO_HOLE_END, MMIO_HOLE_START
from vmm.memory import GuestMemory
from vmm.tcg.cpuid import CpuidOptions, CpuidProfile
from vmm.tcg.debug import SUPPORT as DEBUG_SUPPORT
from vmm.tcg.debug import TcgDebugHooks
from vmm.tcg.delivery import InterruptDelivery
from vmm.tcg.device_writes import TranslationInvalidator
from vmm.tcg.engine import Engine
from vmm.tcg.io_dispatch import IoHooks
from vmm.tcg.native_exceptions import ExceptionHook
from vmm.tcg.scheduler import SLICE_NS, CpuScheduler
from vmm.tcg.ticker import Ticker
from vmm.tcg.unicorn_lib import uc_const, x86
from vmm.tcg.vcpu import SharedCpu, TcgVcpu

log = logging.getLogger(__name__)

PAGE = 0x1000
# The local APIC timer's input clock, also announced as CPUID 0x15's crystal so
# that Linux needs to calibrate neither the TSC nor the APIC timer. 25 MHz, as
# on many Intel parts; it also keeps Linux's 32-bit crystal_khz * EBX from overflowing.
LAPIC_TIMER_HZ = 25_000_000


class TcgVirtualMachine(VirtualMachine):
    def __init__(self, memory: GuestMemory, io: MachineIo, platform: PlatformOptions) -> None:
        self.memory = memory
        self.io = io
        self.platform = platform
        # The guest learns the TSC's rate from CPUID 0x15, which needs a local APIC.
        self.engine = Engine(measure_tsc=platform.irqchip, vendor=platform.cpu_vendor or "intel")
        self.scheduler = CpuScheduler(self.engine)
        self.delivery = InterruptDelivery(self.engine, memory)
        self.cpuid = CpuidProfile(self.engine.native_cpuid, CpuidOptions(
            cpus=platform.cpus, local_apic=platform.irqchip, tsc_hz=self.engine.tsc_hz,
            apic_timer_hz=LAPIC_TIMER_HZ if platform.irqchip else None,
            edits=list(platform.cpu_features)))
        self.vcpus: dict[int, TcgVcpu] = {}
        self.ticker = Ticker(self.engine.stop_hook.request)
        self.scheduler.on_contention = self._on_contention
        # The emulated PIC/PIT/I/O APIC/local APICs that KVM would keep in the kernel.
        self.router: InterruptRouter | None = None
        if platform.irqchip:
            self.router = InterruptRouter(platform.cpus, wake_cpu=self._wake_cpu, on_init=self._on_init,
                                          on_sipi=self._on_sipi, lapic_bus_hz=LAPIC_TIMER_HZ)
            self.router.attach(io.pio, io.mmio, current_cpu=lambda: self.scheduler.owner.index)
        # The reset state every new vCPU starts from.
        self._pristine = self.engine.new_context()
        self._pristine.save()
        self._map_memory()
        self.shared = SharedCpu(self.engine, self.scheduler, self.delivery, self.invalidator, self.ticker,
                                self.router, memory, io, self._pristine, TcgDebugHooks(self.engine, self.scheduler),
                                self.io_hooks)
        self._install_hooks()

    # -- the VirtualMachine interface -------------------------------------------------

    def create_vcpu(self, index: int) -> TcgVcpu:
        if index in self.vcpus:
            raise ValueError(f"vCPU {index} exists already")
        self.io_hooks.hook_ports(self.engine)  # the devices are on the buses by now
        vcpu = TcgVcpu(self.shared, index)
        self.vcpus[index] = vcpu
        return vcpu

    def irq_line(self, gsi: int) -> IrqLine:
        if self.router is None:
            return NullIrqLine()
        return self.router.irq_line(gsi)

    def debug_support(self) -> DebugSupport:
        return DEBUG_SUPPORT

    def close(self) -> None:
        self.memory.device_write_listener = self.memory.native_write_listener = None
        self.ticker.close()
        for vcpu in self.vcpus.values():
            vcpu.close()
        self.vcpus.clear()
        if self._pristine is not None:
            self._pristine.free()
            self._pristine = None
        self.engine.close()

    # -- events from the interrupt controllers (any thread) ------------------------

    def _wake_cpu(self, cpu: int) -> None:
        vcpu = self.vcpus.get(cpu)
        if vcpu is not None:
            vcpu.wake()
        running = self.scheduler.owner
        if running is not None and running.index != cpu:
            # Let the woken vCPU have the CPU soon: it may be the target of an IPI
            # whose sender now spins waiting for the answer.
            self.ticker.arm(self.scheduler.owner_since + SLICE_NS // 4)

    def _on_init(self, cpu: int) -> None:
        vcpu = self.vcpus.get(cpu)
        if vcpu is not None:
            vcpu.receive_init()

    def _on_sipi(self, cpu: int, vector: int) -> None:
        vcpu = self.vcpus.get(cpu)
        if vcpu is not None:
            vcpu.receive_sipi(vector)

    def _on_contention(self) -> None:
        """Another vCPU waits for the CPU (scheduler lock held): end the owner's slice in time."""
        self.ticker.arm(self.scheduler.owner_since + SLICE_NS)

    def after_device_write(self) -> None:
        """A guest write moved a timer, maybe earlier than the running slice's end."""
        deadline = self.router.next_deadline()
        if deadline is not None:
            self.ticker.arm(deadline)

    # -- memory ------------------------------------------------------------------

    def _map_memory(self) -> None:
        hosts = []
        for region in self.memory.regions:
            host = region.host_address()
            self.engine.map_ram(region.guest_address, region.size, host)
            hosts.append(host)
        # Device writes into RAM must drop the code translated from it (vmm/tcg/device_writes.py).
        self.invalidator = TranslationInvalidator(self.engine.handle, self.memory, hosts)
        self.memory.device_write_listener = self.invalidator.devices_wrote
        self.memory.native_write_listener = self.invalidator.native_listener
        low_ram_end = self.memory.regions[0].end
        mmio_start = min(max(low_ram_end, 0), MMIO_HOLE_START)
        mmio_start = (mmio_start + PAGE - 1) & ~(PAGE - 1)
        # Firmware mapped at the top of the hole (GuestMemory.add_firmware) ends the MMIO window.
        mmio_end = min([r.guest_address for r in self.memory.regions[1:] if r.guest_address < MMIO_HOLE_END],
                       default=MMIO_HOLE_END)
        # Port I/O and the MMIO hole go straight to the buses (vmm/tcg/io_dispatch.py).
        self.io_hooks = IoHooks(self.scheduler, self.io, self.router, self.after_device_write)
        self.io_hooks.install(self.engine, mmio_start, mmio_end)

    # -- hooks -------------------------------------------------------------------

    def _install_hooks(self) -> None:
        uc = self.engine.uc
        self._exception_hook = ExceptionHook(uc, self._hook_interrupt)
        uc.hook_add(uc_const.UC_HOOK_INSN_INVALID, self._hook_invalid_instruction)
        uc.hook_add(uc_const.UC_HOOK_INSN, self._hook_cpuid, None, 1, 0, x86.UC_X86_INS_CPUID)
        uc.hook_add(uc_const.UC_HOOK_INSN, self._hook_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        uc.hook_add(uc_const.UC_HOOK_INSN, self._hook_sysenter, None, 1, 0, x86.UC_X86_INS_SYSENTER)

    def _hook_interrupt(self, vector: int) -> None:
        self.scheduler.owner.on_exception(vector)

    def _hook_invalid_instruction(self, uc, user_data) -> bool:
        return self.scheduler.owner.on_invalid_instruction()

    def _hook_cpuid(self, uc, user_data) -> int:
        engine = self.engine
        leaf, subleaf = engine.read_regs(CPUID_INPUTS)
        engine.write_regs(CPUID_OUTPUTS, self.cpuid.lookup(self.scheduler.owner.index, leaf & 0xFFFFFFFF,
                                                           subleaf & 0xFFFFFFFF, engine))
        return 1  # skip Unicorn's own CPUID

    def _hook_syscall(self, uc, user_data) -> None:
        self.scheduler.owner.on_syscall()

    def _hook_sysenter(self, uc, user_data) -> None:
        self.scheduler.owner.on_sysenter()


CPUID_INPUTS = (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX)
CPUID_OUTPUTS = (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX)
