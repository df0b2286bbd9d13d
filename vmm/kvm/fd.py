"""File-descriptor objects for the three levels of the KVM API.

`KvmSystem` (/dev/kvm) creates `VmFd`s, a `VmFd` creates `VcpuFd`s; each owns
its fd and closes it in `close()`. Every ioctl is a method that returns data
or raises `KvmError`, which names the ioctl and the errno.

ioctls go through libc via cffi rather than `fcntl.ioctl`: the call releases
the GIL (a vCPU thread blocked in KVM_RUN must not stop the others) and an
interrupted KVM_RUN comes back as EINTR instead of being retried.
"""

from __future__ import annotations

import errno
import mmap
import os

from vmm.errors import PyvmmError
from vmm.kvm import ioctls
from vmm.kvm import uapi as k
from vmm.kvm.uapi import ffi, libc

# Capabilities without which pyvmm cannot build a machine at all.
REQUIRED_CAPABILITIES = {
    k.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
    k.KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    k.KVM_CAP_EXT_CPUID: "KVM_CAP_EXT_CPUID",
    k.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT",
}


class KvmError(PyvmmError):
    """An ioctl failed."""

    def __init__(self, request: int, err: int, what: str = "") -> None:
        self.errno = err
        name = ioctls.NAMES.get(request, f"ioctl {request:#x}")
        detail = f" ({what})" if what else ""
        super().__init__(f"{name}{detail} failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})")


class KvmUnavailable(PyvmmError):
    """/dev/kvm cannot be used; the message says why and what to do."""


_NO_ARG = ffi.cast("unsigned long", 0)


def _ioctl(fd: int, request: int, arg=_NO_ARG, what: str = "") -> int:
    result = libc.ioctl(fd, ffi.cast("unsigned long", request), arg)
    if result < 0:
        raise KvmError(request, ffi.errno, what)
    return result


def _ptr(cdata) -> object:
    return ffi.cast("void *", cdata)


class KvmSystem:
    """An open /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: enable virtualisation (VT-x/AMD-V) and load kvm_intel or kvm_amd"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"permission denied opening {path}: run as root or add your user to the 'kvm' group"
            ) from None
        except OSError as err:
            raise KvmUnavailable(f"cannot open {path}: {err.strerror}") from None
        try:
            try:
                self.api_version = _ioctl(self.fd, ioctls.KVM_GET_API_VERSION)
            except KvmError as err:
                raise KvmUnavailable(f"{path} is not a KVM device ({err})") from None
            if self.api_version != k.KVM_API_VERSION:
                raise KvmUnavailable(
                    f"{path} speaks KVM API version {self.api_version}, pyvmm needs {k.KVM_API_VERSION}"
                )
            for cap, name in REQUIRED_CAPABILITIES.items():
                if not self.check_extension(cap):
                    raise KvmUnavailable(f"{path} lacks {name}, which pyvmm requires")
            self.vcpu_mmap_size = _ioctl(self.fd, ioctls.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, capability: int) -> int:
        return _ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, ffi.cast("unsigned long", capability))

    def supported_cpuid(self) -> list[tuple[int, ...]]:
        """KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx) tuples."""
        capacity = 128
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": capacity, "entries": capacity})
            try:
                _ioctl(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID, _ptr(cpuid))
            except KvmError as err:
                if err.errno == errno.E2BIG and capacity < 4096:
                    capacity *= 2
                    continue
                raise
            return [
                (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in cpuid.entries[0 : cpuid.nent]
            ]

    def create_vm(self) -> VmFd:
        return VmFd(self, _ioctl(self.fd, ioctls.KVM_CREATE_VM))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VmFd:
    def __init__(self, system: KvmSystem, fd: int) -> None:
        self.system = system
        self.fd = fd

    def set_user_memory_region(self, slot: int, guest_address: int, size: int, host_address: int) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {"slot": slot, "guest_phys_addr": guest_address, "memory_size": size,
             "userspace_addr": host_address},
        )
        _ioctl(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION, _ptr(region), f"slot {slot}")

    def set_tss_address(self, address: int) -> None:
        # The address is the ioctl argument itself: it must travel as an
        # unsigned long (0xfffbd000 does not fit a C int).
        _ioctl(self.fd, ioctls.KVM_SET_TSS_ADDR, ffi.cast("unsigned long", address))

    def set_identity_map_address(self, address: int) -> None:
        value = ffi.new("uint64_t *", address)
        _ioctl(self.fd, ioctls.KVM_SET_IDENTITY_MAP_ADDR, _ptr(value))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, ioctls.KVM_CREATE_IRQCHIP)

    def get_irqchip(self, chip_id: int):
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        _ioctl(self.fd, ioctls.KVM_GET_IRQCHIP, _ptr(chip), f"chip {chip_id}")
        return chip

    def set_irqchip(self, chip) -> None:
        _ioctl(self.fd, ioctls.KVM_SET_IRQCHIP, _ptr(chip), f"chip {chip.chip_id}")

    def create_pit2(self) -> None:
        config = ffi.new("struct kvm_pit_config *", {"flags": k.KVM_PIT_SPEAKER_DUMMY})
        _ioctl(self.fd, ioctls.KVM_CREATE_PIT2, _ptr(config))

    def set_gsi_routing(self, routes: list[tuple[int, int, int]]) -> None:
        """Replace KVM's GSI routing with (gsi, irqchip, pin) entries."""
        table = k.ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for entry, (gsi, chip, pin) in zip(table.entries, routes, strict=True):
            entry.gsi, entry.type = gsi, k.KVM_IRQ_ROUTING_IRQCHIP
            entry.u.irqchip.irqchip, entry.u.irqchip.pin = chip, pin
        _ioctl(self.fd, ioctls.KVM_SET_GSI_ROUTING, _ptr(table))

    def irq_line(self, irq: int, level: bool) -> None:
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)})
        _ioctl(self.fd, ioctls.KVM_IRQ_LINE, _ptr(line), f"irq {irq}")

    def irqfd(self, eventfd: int, gsi: int) -> None:
        """Each write to `eventfd` is an edge on `gsi`, raised and lowered inside KVM."""
        request = ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi})
        _ioctl(self.fd, ioctls.KVM_IRQFD, _ptr(request), f"gsi {gsi}")

    def ioeventfd(self, eventfd: int, address: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        flags = (k.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (k.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= k.KVM_IOEVENTFD_FLAG_DATAMATCH
        request = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": address, "len": length, "fd": eventfd, "flags": flags},
        )
        _ioctl(self.fd, ioctls.KVM_IOEVENTFD, _ptr(request), f"address {address:#x}")

    def create_vcpu(self, index: int) -> VcpuFd:
        fd = _ioctl(self.fd, ioctls.KVM_CREATE_VCPU, ffi.cast("unsigned long", index), f"vcpu {index}")
        return VcpuFd(fd, self.system.vcpu_mmap_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuFd:
    """A vCPU fd and its mmap'd `kvm_run` page, through which exits are reported."""

    def __init__(self, fd: int, mmap_size: int) -> None:
        self.fd = fd
        self._run_mapping = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buffer = ffi.from_buffer(self._run_mapping)
        self.kvm_run = ffi.cast("struct kvm_run *", self._run_buffer)
        self.kvm_run_address = int(ffi.cast("uintptr_t", self.kvm_run))
        # The raw page, for the I/O data area that kvm_run.io.data_offset points into.
        self.run_page = memoryview(self._run_mapping)

    def run(self) -> bool:
        """Enter the guest. Returns False when interrupted by a signal (EINTR) or EAGAIN."""
        if _ioctl_run(self.fd, _KVM_RUN, _NO_ARG) < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                return False
            raise KvmError(ioctls.KVM_RUN, err)
        return True

    def _get(self, request: int, ctype: str):
        value = ffi.new(ctype + " *")
        _ioctl(self.fd, request, _ptr(value))
        return value

    def get_regs(self):
        return self._get(ioctls.KVM_GET_REGS, "struct kvm_regs")

    def set_regs(self, regs) -> None:
        _ioctl(self.fd, ioctls.KVM_SET_REGS, _ptr(regs))

    def get_sregs(self):
        return self._get(ioctls.KVM_GET_SREGS, "struct kvm_sregs")

    def set_sregs(self, sregs) -> None:
        _ioctl(self.fd, ioctls.KVM_SET_SREGS, _ptr(sregs))

    def get_fpu(self):
        return self._get(ioctls.KVM_GET_FPU, "struct kvm_fpu")

    def set_fpu(self, fpu) -> None:
        _ioctl(self.fd, ioctls.KVM_SET_FPU, _ptr(fpu))

    def get_lapic(self):
        return self._get(ioctls.KVM_GET_LAPIC, "struct kvm_lapic_state")

    def set_lapic(self, lapic) -> None:
        _ioctl(self.fd, ioctls.KVM_SET_LAPIC, _ptr(lapic))

    def set_cpuid(self, entries: list[tuple[int, ...]]) -> None:
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for slot, (function, index, flags, eax, ebx, ecx, edx) in zip(cpuid.entries, entries, strict=True):
            slot.function, slot.index, slot.flags = function, index, flags
            slot.eax, slot.ebx, slot.ecx, slot.edx = eax, ebx, ecx, edx
        _ioctl(self.fd, ioctls.KVM_SET_CPUID2, _ptr(cpuid))

    def set_msrs(self, msrs: dict[int, int]) -> None:
        request = ffi.new("struct kvm_msrs *", {"nmsrs": len(msrs), "entries": len(msrs)})
        for slot, (index, data) in zip(request.entries, msrs.items(), strict=True):
            slot.index, slot.data = index, data
        written = _ioctl(self.fd, ioctls.KVM_SET_MSRS, _ptr(request))
        if written != len(msrs):
            failed = list(msrs)[written]
            raise PyvmmError(f"KVM_SET_MSRS: KVM refused MSR {failed:#x}")

    def set_guest_debug(self, control: int, debugreg: list[int]) -> None:
        request = ffi.new("struct kvm_guest_debug *", {"control": control, "debugreg": debugreg})
        _ioctl(self.fd, ioctls.KVM_SET_GUEST_DEBUG, _ptr(request))

    def translate(self, linear_address: int) -> int | None:
        request = ffi.new("struct kvm_translation *", {"linear_address": linear_address})
        _ioctl(self.fd, ioctls.KVM_TRANSLATE, _ptr(request))
        return request.physical_address if request.valid else None

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.release()
            del self.kvm_run
            self._run_buffer = None
            try:
                self._run_mapping.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1


_KVM_RUN = ffi.cast("unsigned long", ioctls.KVM_RUN)
_ioctl_run = libc.ioctl
