"""Booting through firmware (SeaBIOS), and what pyvmm tells firmware through fw_cfg.

The firmware image is mapped where a PC's flash sits, ending at 4 GiB, and
its last 128 KiB are also copied into RAM at 0xE0000-0xFFFFF (SeaBIOS keeps
its variables there and runs from there once it leaves the reset vector).
The boot vCPU starts at the reset vector, F000:FFF0 with the code segment's
base at 0xFFFF0000, in real mode, as a PC's does.

`add_machine_facts` gives every machine the items QEMU's microvm gives:
the RAM size, the CPU count, no graphics (so SeaBIOS prints on COM1), no
boot menu, the PIT's IRQ 0 routed to I/O APIC pin 2 (as the MADT says), and
`etc/e820`, the RAM ranges (le64 address, le64 length, le32 type), from
which SeaBIOS builds the map it hands the OS. Test kernels such as
kvm-unit-tests read the CPU count and RAM size from here too.
`add_boot_files` adds what a firmware boot needs besides: the ACPI tables
through the table loader (boot/acpi/table_loader.py), `etc/boot-fail-wait`
and `bootorder`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from devices import fw_cfg as fw_cfg_device
from devices.board import Board
from devices.fw_cfg import (
    KEY_BOOT_MENU,
    KEY_IRQ0_OVERRIDE,
    KEY_MAX_CPUS,
    KEY_NB_CPUS,
    KEY_NOGRAPHIC,
    KEY_RAM_SIZE,
    FwCfg,
)
from vmm.cpu_state import CpuState
from vmm.errors import PyvmmError
from vmm.layout import HIGH_MEMORY_START, MMIO_HOLE_END, KiB
from vmm.memory import GuestMemory, ram_layout

# Debian's `seabios` package: the build whose DSDT parser finds virtio-mmio disks.
DEFAULT_BIOS = Path("/usr/share/seabios/bios-microvm.bin")
# Larger images would reach the pages KVM keeps below (layout.KVM_TSS_ADDRESS).
MAX_BIOS_SIZE = 256 * KiB
LOW_BIOS_SIZE = 128 * KiB  # the part that also sits below 1 MiB
RESET_CS = 0xF000
RESET_CS_BASE = 0xFFFF_0000
RESET_IP = 0xFFF0
# SeaBIOS waits this long (ms) after "No bootable device." before resetting;
# 0 resets at once, and pyvmm ends on a reset (QEMU's default, all ones, waits forever).
BOOT_FAIL_WAIT_MS = 0
NO_BOOTABLE_DEVICE = b"No bootable device."

E820_RAM = 1
E820_ENTRY = struct.Struct("<QQI")


def e820_file(memory_size: int) -> bytes:
    """`etc/e820`: one RAM entry per range of guest RAM (below the MMIO hole, from 4 GiB)."""
    return b"".join(E820_ENTRY.pack(address, size, E820_RAM) for address, size in ram_layout(memory_size))


def add_machine_facts(fw_cfg: FwCfg, memory_size: int, cpus: int) -> None:
    fw_cfg.add_item(KEY_RAM_SIZE, struct.pack("<Q", memory_size))
    fw_cfg.add_item(KEY_NOGRAPHIC, struct.pack("<H", 1))
    fw_cfg.add_item(KEY_NB_CPUS, struct.pack("<H", cpus))
    fw_cfg.add_item(KEY_MAX_CPUS, struct.pack("<H", cpus))
    fw_cfg.add_item(KEY_BOOT_MENU, struct.pack("<H", 0))
    fw_cfg.add_item(KEY_IRQ0_OVERRIDE, struct.pack("<I", 1))
    fw_cfg.add_file("etc/e820", e820_file(memory_size))


def read_bios(path: Path | None) -> bytes:
    """The firmware image from `path` (--bios), or Debian's SeaBIOS; a PyvmmError says what is wrong."""
    where = path if path is not None else DEFAULT_BIOS
    try:
        data = where.read_bytes()
    except FileNotFoundError:
        if path is None:
            raise PyvmmError(f"booting a disk needs firmware: {DEFAULT_BIOS} is missing "
                             "(install Debian's seabios package, or give --bios FILE)") from None
        raise PyvmmError(f"--bios {path}: no such file") from None
    except OSError as err:
        raise PyvmmError(f"cannot read {where}: {err.strerror}") from None
    if not data or len(data) % (4 * KiB) or len(data) > MAX_BIOS_SIZE:
        raise PyvmmError(f"{where}: a firmware image is a multiple of 4K and at most "
                         f"{MAX_BIOS_SIZE // KiB}K, this one has {len(data)} bytes")
    return data


def map_bios(memory: GuestMemory, data: bytes) -> None:
    """Map the image below 4 GiB (before the accelerator maps memory) and copy its top into low RAM."""
    memory.add_firmware(MMIO_HOLE_END - len(data), data)
    low = data[-LOW_BIOS_SIZE:]
    memory.write(HIGH_MEMORY_START - len(low), low)


def reset_vector_state() -> CpuState:
    state = CpuState.real_mode(RESET_CS, RESET_IP)
    state.segments["cs"].base = RESET_CS_BASE
    return state


def bootorder_file(boot_windows: Iterable[int]) -> bytes:
    """`bootorder`: one device path per line, first boots first. SeaBIOS matches a
    virtio-mmio disk by the glob "/virtio-mmio@<base, 16 hex digits>/*"; disks not
    listed come after, in MMIO-address order. SeaBIOS boots only the first hard disk."""
    return b"".join(b"/virtio-mmio@%016x/disk@0,0\n" % base for base in boot_windows)


def add_boot_files(fw_cfg: FwCfg, cpus: int, devices: Iterable[bytes],
                   boot_windows: Iterable[int] = ()) -> None:
    """The firmware's files; `devices`: the devices' DSDT entries (devices/board.py);
    `boot_windows`: the bases of the disks to boot from, in order."""
    # Imported here: only a disk boot needs it (start-up time).
    from boot.acpi.table_loader import build_loader_files

    for name, data in build_loader_files(cpus, devices).items():
        fw_cfg.add_file(name, data)
    fw_cfg.add_file("etc/boot-fail-wait", struct.pack("<I", BOOT_FAIL_WAIT_MS))
    fw_cfg.add_file("bootorder", bootorder_file(boot_windows))


class BootFailureWatch:
    """Passes serial output on, noting whether the firmware said "No bootable device."

    The firmware resets right after saying it; the machine then tells that
    reset apart from a guest's reboot by this flag.
    """

    def __init__(self, write) -> None:
        self._write = write
        self._tail = b""
        self.seen = False

    def __call__(self, data: bytes):
        if not self.seen:
            window = self._tail + bytes(data)
            self.seen = NO_BOOTABLE_DEVICE in window
            self._tail = window[-(len(NO_BOOTABLE_DEVICE) - 1):]
        return self._write(data)


def plug_fw_cfg(board: Board) -> FwCfg:
    """fw_cfg on the machine's board (devices/fw_cfg.py), holding the machine's facts."""
    fw_cfg = fw_cfg_device.plug(board)
    add_machine_facts(fw_cfg, board.memory.size, board.cpus)
    return fw_cfg
