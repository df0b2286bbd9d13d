"""`KvmAccelerator` and `KvmVm`: the vmm.accel interface implemented on /dev/kvm.

The VM owns guest memory slots, the in-kernel irqchip and PIT (wired by
vmm/kvm/irq.py), the eventfds of the virtio fast paths, and its vCPUs
(vmm/kvm/vcpu.py, where every exit starts).
"""

from __future__ import annotations

import logging
import os

from vmm.accel import Accelerator, MachineIo, PlatformOptions, VirtualMachine
from vmm.errors import PyvmmError
from vmm.guest_debug import DebugSupport
from vmm.kvm import debug as guest_debug
from vmm.kvm import quirks
from vmm.kvm import uapi as k
from vmm.kvm.cpuid import beyond_kvm, cpuid_for_vcpu
from vmm.kvm.exit_loop import use_compiled_loop
from vmm.kvm.fd import KvmSystem
from vmm.kvm.irq import KvmIrqLine, mask_8259s, pc_gsi_routing
from vmm.kvm.vcpu import KvmVcpu, install_kick_handler
from vmm.layout import KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)


class KvmAccelerator(Accelerator):
    # The compiled virtio-blk path was made for the software CPU. On the nested KVM, where the
    # I/O thread runs it, the Linux virtio test lost its virtio-console output with it
    # (docs/benchmarks.md, "The compiled request path"), never without: KVM keeps the Python
    # path until that is understood.
    compiled_blk_requests = False

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.system = KvmSystem(path)
        install_kick_handler()
        self.compiled_exit_loop = use_compiled_loop()
        self.name = "kvm, compiled exit loop" if self.compiled_exit_loop else "kvm, Python exit loop"

    def can_run_linux(self) -> tuple[bool, str]:
        return quirks.can_run_linux()

    def linux_cmdline_additions(self) -> list[str]:
        return quirks.linux_cmdline_additions()

    def create_vm(self, memory: GuestMemory, io: MachineIo, platform: PlatformOptions) -> KvmVm:
        return KvmVm(self.system, memory, platform, io if self.compiled_exit_loop else None)

    def close(self) -> None:
        self.system.close()


class KvmVm(VirtualMachine):
    def __init__(self, system: KvmSystem, memory: GuestMemory, platform: PlatformOptions,
                 compiled_loop_io: MachineIo | None) -> None:
        self.memory = memory
        self._compiled_loop_io = compiled_loop_io  # None: the Python exit loop (vmm/kvm/exit_loop.py)
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
                self.fd.set_user_memory_region(slot, region.guest_address, region.size, region.host_address())
            if platform.irqchip:
                self.fd.create_irqchip()
                mask_8259s(self.fd)
                self.fd.set_gsi_routing(pc_gsi_routing())
                self.fd.create_pit2()
            self._supported_cpuid = system.supported_cpuid()
            self._tsc_deadline = bool(platform.irqchip and system.check_extension(k.KVM_CAP_TSC_DEADLINE_TIMER))
            for edit in beyond_kvm(self._supported_cpuid, platform.cpu_features, tsc_deadline=self._tsc_deadline):
                log.warning("--cpu-features +%s: this host's KVM cannot give a guest %s; left out",
                            edit.name, edit.name)
        except BaseException:
            self.fd.close()
            raise

    def create_vcpu(self, index: int) -> KvmVcpu:
        block_irq = bool(self.fd.system.check_extension(k.KVM_CAP_SET_GUEST_DEBUG2) & k.KVM_GUESTDBG_BLOCKIRQ)
        vcpu = KvmVcpu(index, self.fd.create_vcpu(index), self.memory, step_blocks_irq=block_irq,
                       compiled_loop_io=self._compiled_loop_io)
        self._vcpus.append(vcpu)
        # A guest that enables long mode itself needs CPUID set first, or
        # its wrmsr to EFER faults.
        edits = [*quirks.cpuid_edits(), *self.platform.cpu_features]
        vcpu.fd.set_cpuid(cpuid_for_vcpu(self._supported_cpuid, index, self.platform.cpus, edits,
                                         tsc_deadline=self._tsc_deadline))
        if self.platform.irqchip:
            # Imported here: a flat guest never needs it (start-up time).
            from vmm.kvm.firmware_state import set_firmware_state

            set_firmware_state(vcpu.fd)
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
