"""What the user asked for, parsed and checked: `MachineConfig` and size parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vmm.cpu_features import FeatureEdit
from vmm.errors import PyvmmError
from vmm.gdb.options import GdbSpec
from vmm.image.sizes import parse_size
from vmm.virtio_options import VirtioSpecs

MAX_MEMORY = 1 << 40  # 1 TiB: more than any host pyvmm runs on; catches typos like 512G0
MAX_CPUS = 64  # xAPIC IDs and the MADT would allow 255; 64 is what is tested

# The serial console; reboot through the FADT's reset register, the quickest
# way out (without any reboot=, Linux on a hardware-reduced ACPI machine tries
# EFI, then jumps to the reset vector, where pyvmm's reset stub ends the VM
# too); and on a panic pyvmm hears of it through pvpanic and the guest reboots
# at once rather than hanging. boot/reboot_params.py adds reboot=panic_warm to
# this and to the user's command lines.
DEFAULT_CMDLINE = "console=ttyS0 reboot=acpi panic=-1"


def parse_memory_size(text: str) -> int:
    """`--memory`: a size as `pyvmm img` reads it (vmm/image/sizes.py), except that a
    bare number means MiB, as with QEMU's -m, and `512MiB`/`512MB` read as `512M`."""
    size = text.strip()
    stem = size.removesuffix("B").removesuffix("b")
    stem = stem.removesuffix("i") if stem != size else stem
    if stem != size and stem[-1:] in tuple("KMGTkmgt"):
        size = stem
    if size.isdigit():
        size += "M"
    return parse_size(size, "--memory")


@dataclass
class MachineConfig:
    memory: int = 512 << 20
    cpus: int = 1
    accel: str = "auto"
    flat: Path | None = None
    kernel: Path | None = None
    # The firmware for a disk boot (no --kernel, no --flat); None: Debian's SeaBIOS.
    bios: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    # Let a bzImage decompress itself in the guest instead of on the host.
    guest_decompress: bool = False
    cpu_features: list[FeatureEdit] = field(default_factory=list)
    # The software CPU's vendor (--cpu-vendor, one of CPU_VENDORS); None: its default, Intel.
    cpu_vendor: str | None = None
    stats: bool = False
    # QEMU's pc-testdev, for kvm-unit-tests (devices/pc_testdev.py).
    test_devices: bool = False
    # --disk, --net, --fs, --console virtio, --rng (vmm/virtio_options.py).
    virtio: VirtioSpecs = field(default_factory=VirtioSpecs)
    # --gdb / -s / -S (vmm/gdb/options.py): None without a debugger.
    gdb: GdbSpec | None = None
    # Stop the VM with exit_status.TIMED_OUT after this many seconds (--timeout).
    timeout: float | None = None

    @property
    def is_linux(self) -> bool:
        """A PC for an operating system, booted directly (--kernel) or by firmware from a disk."""
        return self.flat is None

    @property
    def boots_firmware(self) -> bool:
        return self.kernel is None and self.flat is None

    def validate(self) -> None:
        if self.memory < 1 << 20:
            raise PyvmmError(f"--memory must be at least 1M (got {self.memory} bytes)")
        if self.memory > MAX_MEMORY:
            raise PyvmmError(f"--memory {self.memory >> 30}G is more than pyvmm supports (1T)")
        if self.memory % 4096:
            raise PyvmmError("--memory must be a multiple of 4K")
        if self.timeout is not None and not 0 < self.timeout < 1e9:
            raise PyvmmError(f"--timeout must be a positive number of seconds (got {self.timeout:g})")
        if self.cpus < 1:
            raise PyvmmError(f"--cpus must be at least 1 (got {self.cpus})")
        if self.cpus > MAX_CPUS:
            raise PyvmmError(f"--cpus {self.cpus} is more than pyvmm supports ({MAX_CPUS})")
        if self.boots_firmware and not self.virtio.disks:
            raise PyvmmError("nothing to boot: give a DISK image, --cdrom ISO, --kernel KERNEL or --flat IMAGE")
        if self.bios is not None and not self.boots_firmware:
            raise PyvmmError("--bios boots a disk through firmware; it excludes --kernel and --flat")
        if self.cpu_vendor is not None and self.accel == "kvm":
            raise PyvmmError("--cpu-vendor chooses the software CPU's vendor; a KVM guest sees the host's CPU "
                             "(use --accel tcg)")
        if self.flat is not None and self.kernel is not None:
            raise PyvmmError("--flat and --kernel exclude each other")
        if self.flat is not None and self.cpus > 1:
            raise PyvmmError("--flat guests run on one vCPU (they have no interrupt controller to start others)")
        if self.flat is not None and self.virtio.count:
            raise PyvmmError("--flat guests have no virtio devices (DISK, --disk, --cdrom, --net, --fs, "
                             "--console virtio, --rng)")
        if self.kernel is None and self.test_devices:
            raise PyvmmError("--test-devices needs --kernel")
        if self.kernel is None and (self.initrd is not None or self.cmdline is not None):
            raise PyvmmError("--initrd and --cmdline need --kernel")
        for option, path in (("--flat", self.flat), ("--kernel", self.kernel), ("--initrd", self.initrd)):
            if path is not None and not path.is_file():
                raise PyvmmError(f"{option} {path}: no such file")
