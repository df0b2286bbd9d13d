"""Multiboot (version 1) kernels: find the header, load the image, hand over the information.

What the Multiboot Specification 0.6.96 asks of a boot loader, and QEMU's
`-kernel` does: a kernel is recognised by a header (magic 0x1BADB002, flags,
checksum making the three sum to zero) 32-bit aligned in its first 8 KiB
(boot/multiboot_header.py finds it). It
is loaded by its ELF program headers, or, when header flag 16 is set, by the
header's own address fields (load_addr, load_end_addr, bss_end_addr,
entry_addr, with header_addr placing the file). It is entered in 32-bit
protected mode, paging off, interrupts off, flat 4 GiB code and data
segments, EAX = 0x2BADB002 and EBX = the physical address of the multiboot
information structure: lower and upper memory, the memory map (pyvmm's
e820 map), the command line (the kernel's file name, then `--cmdline`, as
GRUB and QEMU give it), the modules (each `--initrd` file, page
aligned after the kernel) and the boot loader's name. The machine is in the
state a PC BIOS leaves (boot/bios_state.py), as after QEMU's SeaBIOS.

Every address in the header or the program headers is checked: the image must
lie in RAM below 4 GiB and clear of what pyvmm places below 1 MiB (the
interrupt vector table and BIOS data area, the entry GDT, this information
structure, the command line, the BIOS area with the ACPI tables); kvm-unit-tests' real-mode test, for one, loads at 0x8000.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from boot.bios_state import install_bios_state
from boot.e820 import E820_RAM, build_e820
from boot.elf import ELF_MAGIC, ELFCLASS32, EM_386, Segment, read_executable
from boot.multiboot_header import FLAG_ADDRESS_FIELDS, MultibootError, MultibootHeader
from boot.pagetables import encode_descriptor
from boot.vmlinux import Vmlinux, load_vmlinux
from vmm.cpu_state import CR0_ET, CR0_PE, RFLAGS_RESERVED, CpuState
from vmm.cpu_state import Segment as CpuSegment
from vmm.errors import PyvmmError
from vmm.layout import (
    BOOT_GDT_ADDRESS,
    CMDLINE_ADDRESS,
    CMDLINE_MAX_SIZE,
    EBDA_START,
    HIGH_MEMORY_START,
    IVT_AND_BDA_END,
    MULTIBOOT_INFO_ADDRESS,
    MULTIBOOT_INFO_SIZE,
    KiB,
)
from vmm.memory import GuestMemory

BOOTLOADER_MAGIC = 0x2BADB002  # in EAX at the kernel's entry

# Information structure flags: which fields are valid.
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODULES = 1 << 3
INFO_MEMORY_MAP = 1 << 6
INFO_LOADER_NAME = 1 << 9
INFO_STRUCT_SIZE = 88  # up to and including the VBE fields, which stay zero
MMAP_ENTRY_SIZE = 24  # a 4-byte size field (20), then base, length, type
LOADER_NAME = b"pyvmm\0"


# The entry GDT (the kernel loads its own; the specification lets GDTR be
# anything, but the segment caches must be flat, and a software CPU may reload
# them from the table): code at 0x10 and data at 0x18, as Linux's 32-bit entry.
ENTRY_CS = 0x10
ENTRY_DS = 0x18
ENTRY_GDT_SIZE = 4 * 8
PAGE_SIZE = 4096


@dataclass(frozen=True)
class Module:
    data: bytes
    name: str  # its command line, as QEMU gives it: the file it came from


def _segments_from_address_fields(header: MultibootHeader, data: bytes) -> tuple[list[Segment], int]:
    h = header
    if h.load_addr > h.header_addr:
        raise ValueError(f"load_addr {h.load_addr:#x} is above header_addr {h.header_addr:#x}")
    file_offset = h.offset - (h.header_addr - h.load_addr)
    if file_offset < 0:
        raise ValueError(f"header_addr - load_addr ({h.header_addr - h.load_addr:#x}) points before the file")
    load_end = h.load_end_addr or h.load_addr + len(data) - file_offset
    if load_end < h.load_addr or file_offset + (load_end - h.load_addr) > len(data):
        raise ValueError(f"load_end_addr {h.load_end_addr:#x} lies outside the file")
    bss_end = h.bss_end_addr or load_end
    if bss_end < load_end:
        raise ValueError(f"bss_end_addr {h.bss_end_addr:#x} is below the end of the loaded image")
    size = load_end - h.load_addr
    segment = Segment(file_offset, h.load_addr, h.load_addr, size, bss_end - h.load_addr)
    if not segment.physical_address <= h.entry_addr < segment.end:
        raise ValueError(f"entry_addr {h.entry_addr:#x} is outside the loaded image")
    return [segment], h.entry_addr


def _segments_from_elf(data: bytes) -> tuple[list[Segment], int]:
    if not data.startswith(ELF_MAGIC):
        raise ValueError("neither an ELF file nor a header with address fields (flag 16)")
    executable = read_executable(data, ELFCLASS32, EM_386, "i386")  # its ElfError is a ValueError
    return list(executable.segments), executable.entry


def pyvmm_structures() -> list[tuple[str, int, int]]:
    """(name, start, end) of what pyvmm places in guest RAM for a multiboot kernel: the image must avoid them."""
    return [("the interrupt vector table and BIOS data area", 0, IVT_AND_BDA_END),
            ("the entry GDT", BOOT_GDT_ADDRESS, BOOT_GDT_ADDRESS + ENTRY_GDT_SIZE),
            ("the multiboot information", MULTIBOOT_INFO_ADDRESS, MULTIBOOT_INFO_ADDRESS + MULTIBOOT_INFO_SIZE),
            ("the command line", CMDLINE_ADDRESS, CMDLINE_ADDRESS + CMDLINE_MAX_SIZE),
            ("the BIOS area and ACPI tables", EBDA_START, HIGH_MEMORY_START)]


def _check_in_ram(memory: GuestMemory, segments: list[Segment]) -> None:
    for seg in segments:
        if seg.end > 1 << 32 or not memory.contains(seg.physical_address, seg.memory_size):
            raise ValueError(f"a segment at {seg.physical_address:#x}-{seg.end:#x} lies outside guest RAM "
                             f"({memory.size >> 20} MiB; RAM below 4 GiB ends at {memory.regions[0].end:#x})")
        for name, start, end in pyvmm_structures():
            if seg.physical_address < end and start < seg.end:
                raise ValueError(f"a segment at {seg.physical_address:#x}-{seg.end:#x} overlaps {name} "
                                 f"pyvmm places at {start:#x}-{end:#x}")
    ordered = sorted(segments, key=lambda s: s.physical_address)
    for first, second in pairwise(ordered):
        if second.physical_address < first.end:
            raise ValueError(f"segments at {first.physical_address:#x} and {second.physical_address:#x} overlap")


def _place_modules(memory: GuestMemory, modules: list[Module], kernel_end: int) -> list[tuple[int, int]]:
    """Page-aligned (start, end) for each module, one after another above the kernel."""
    placed = []
    address = kernel_end
    for module in modules:
        address = (address + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        end = address + len(module.data)
        if end > memory.regions[0].end:
            raise PyvmmError(f"module {module.name} ({len(module.data)} bytes) does not fit in guest RAM "
                             f"below 4 GiB after the kernel (which ends at {kernel_end:#x}); "
                             f"give the guest more --memory")
        placed.append((address, end))
        address = end
    return placed


class _InfoArea:
    """The multiboot information structure and what it points to, packed into one area of guest RAM."""

    def __init__(self) -> None:
        self.blob = bytearray(INFO_STRUCT_SIZE)

    def append(self, data: bytes) -> int:
        self.blob += bytes(-len(self.blob) % 8)
        address = MULTIBOOT_INFO_ADDRESS + len(self.blob)
        self.blob += data
        return address

    def write(self, memory: GuestMemory) -> None:
        if len(self.blob) > MULTIBOOT_INFO_SIZE:
            raise PyvmmError(f"the multiboot information ({len(self.blob)} bytes: too many modules or "
                             f"module names too long) does not fit in its {MULTIBOOT_INFO_SIZE} bytes")
        memory.write(MULTIBOOT_INFO_ADDRESS, self.blob)


def _c_string(text: str, what: str) -> bytes:
    data = text.encode("utf-8")
    if b"\0" in data:
        raise PyvmmError(f"the {what} cannot contain a NUL character")
    return data + b"\0"


def write_info(memory: GuestMemory, cmdline: str, modules: list[Module],
               module_ranges: list[tuple[int, int]]) -> None:
    """Write the command line and the information area (the structure at its start)."""
    e820 = build_e820(memory)
    low = next(e for e in e820 if e.address == 0 and e.type == E820_RAM)
    upper = next(e for e in e820 if e.address == HIGH_MEMORY_START and e.type == E820_RAM)
    area = _InfoArea()
    mmap = b"".join(struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, e.address, e.size, e.type) for e in e820)
    mmap_address = area.append(mmap)
    names = [area.append(_c_string(m.name, "module name")) for m in modules]
    module_list = b"".join(struct.pack("<4I", start, end, name, 0)
                           for (start, end), name in zip(module_ranges, names, strict=True))
    modules_address = area.append(module_list) if modules else 0
    loader_name = area.append(LOADER_NAME)
    command_line = _c_string(cmdline, "command line")
    if len(command_line) > CMDLINE_MAX_SIZE:
        raise PyvmmError(f"the command line is {len(command_line) - 1} bytes; at most {CMDLINE_MAX_SIZE - 1} fit")
    memory.write(CMDLINE_ADDRESS, command_line)
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODULES | INFO_MEMORY_MAP | INFO_LOADER_NAME
    struct.pack_into("<7I", area.blob, 0, flags, low.size // KiB, upper.size // KiB, 0,
                     CMDLINE_ADDRESS, len(modules), modules_address)
    struct.pack_into("<2I", area.blob, 44, len(mmap), mmap_address)
    struct.pack_into("<I", area.blob, 64, loader_name)
    area.write(memory)


def protected_mode_entry(memory: GuestMemory, entry: int) -> CpuState:
    """Write the entry GDT and the BIOS's state; return the vCPU state the specification prescribes
    (at a stub that programs the 8259s and the PIT as a BIOS does, then jumps to `entry`)."""
    code = CpuSegment.flat32_code(ENTRY_CS)
    data = CpuSegment.flat_data(ENTRY_DS)
    gdt = struct.pack("<4Q", 0, 0, encode_descriptor(code), encode_descriptor(data))
    memory.write(BOOT_GDT_ADDRESS, gdt)
    segments = {name: data for name in ("ds", "es", "fs", "gs", "ss")}
    segments["cs"] = code
    segments["tr"] = CpuSegment.tss()
    segments["ldt"] = CpuSegment.ldt()
    return CpuState(
        regs={"rip": install_bios_state(memory, entry, ENTRY_CS, BOOTLOADER_MAGIC), "rax": BOOTLOADER_MAGIC,
              "rbx": MULTIBOOT_INFO_ADDRESS, "rflags": RFLAGS_RESERVED},
        segments=segments,
        gdt=(BOOT_GDT_ADDRESS, len(gdt) - 1),
        idt=(0, 0),
        cr0=CR0_PE | CR0_ET,
    )


def load_multiboot(memory: GuestMemory, kernel_path: Path, header: MultibootHeader, cmdline: str,
                   module_paths: list[Path]) -> CpuState:
    """Load a multiboot kernel, whose `header` read_header() found; return the boot vCPU's state."""
    source = str(kernel_path)
    try:
        data = kernel_path.read_bytes()
    except OSError as err:
        raise PyvmmError(f"cannot read kernel {kernel_path}: {err.strerror}") from None
    try:
        if header.flags & FLAG_ADDRESS_FIELDS:
            segments, entry = _segments_from_address_fields(header, data)
        else:
            segments, entry = _segments_from_elf(data)
        _check_in_ram(memory, segments)
    except ValueError as err:
        raise MultibootError(source, str(err)) from None
    modules = []
    for path in module_paths:
        try:
            modules.append(Module(path.read_bytes(), str(path)))
        except OSError as err:
            raise PyvmmError(f"cannot read module {path}: {err.strerror}") from None
    load_vmlinux(memory, Vmlinux(entry, tuple(segments)), [data])
    kernel_end = max(seg.end for seg in segments)
    ranges = _place_modules(memory, modules, kernel_end)
    for module, (start, _end) in zip(modules, ranges, strict=True):
        memory.write(start, module.data)
    # GRUB and QEMU hand the kernel its own file name as the first word
    # (kvm-unit-tests reads its arguments from argv[1] on).
    write_info(memory, f"{kernel_path} {cmdline}".rstrip(" "), modules, ranges)
    return protected_mode_entry(memory, entry)
