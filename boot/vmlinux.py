"""Parse and load an ELF vmlinux: PT_LOAD segments at their physical addresses.

This is how an uncompressed kernel is booted (Firecracker, QEMU's PVH path):
each loadable segment goes to `p_paddr`, the bytes past `p_filesz` up to
`p_memsz` are zeroed, and the CPU enters `startup_64` at the ELF entry. The
kernel links its entry (`phys_startup_64`) as a physical address; an entry
given as a virtual address is translated through the segment that holds it.
The decompressed payload of a bzImage is such an ELF with the relocation
table appended; the appended bytes are simply never loaded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from boot.bzimage import NotALinuxKernel
from vmm.errors import PyvmmError
from vmm.layout import MiB
from vmm.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
ELF64_HEADER_SIZE = 64
ELF64_PHDR_SIZE = 56
MAX_PROGRAM_HEADERS = 64  # vmlinux has about five; more is a corrupt header


def is_elf(data: bytes | memoryview) -> bool:
    return bytes(data[:4]) == ELF_MAGIC


@dataclass(frozen=True)
class Segment:
    file_offset: int
    physical_address: int
    virtual_address: int
    file_size: int
    memory_size: int

    @property
    def end(self) -> int:
        return self.physical_address + self.memory_size


@dataclass(frozen=True)
class Vmlinux:
    data: bytes | memoryview
    entry: int  # physical address of startup_64
    segments: tuple[Segment, ...]

    @property
    def start(self) -> int:
        return min(s.physical_address for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def parse_vmlinux(data: bytes | memoryview, source: str = "kernel") -> Vmlinux:
    """Validate an x86-64 ELF executable; raise NotALinuxKernel on anything wrong."""

    def fail(reason: str) -> NotALinuxKernel:
        return NotALinuxKernel(source, f"ELF: {reason}")

    if len(data) < ELF64_HEADER_SIZE or not is_elf(data):
        raise fail("no ELF header")
    if data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise fail("not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != EM_X86_64:
        raise fail(f"built for machine {e_machine}, not x86-64")
    if e_type != ET_EXEC:
        raise fail(f"not an executable (ELF type {e_type})")
    (e_entry, e_phoff) = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_phentsize != ELF64_PHDR_SIZE or not 0 < e_phnum <= MAX_PROGRAM_HEADERS:
        raise fail(f"bad program header table ({e_phnum} entries of {e_phentsize} bytes)")
    if e_phoff + e_phnum * ELF64_PHDR_SIZE > len(data):
        raise fail("program header table lies beyond the end of the file (truncated?)")

    segments = []
    for index in range(e_phnum):
        (p_type, _flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align) = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + index * ELF64_PHDR_SIZE
        )
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise fail(f"segment {index} has more file bytes than memory bytes")
        if p_offset + p_filesz > len(data):
            raise fail(f"segment {index} lies beyond the end of the file (truncated?)")
        if p_paddr + p_memsz > 1 << 52:
            raise fail(f"segment {index} has an impossible physical address {p_paddr:#x}")
        segments.append(Segment(p_offset, p_paddr, p_vaddr, p_filesz, p_memsz))
    if not segments:
        raise fail("no loadable segments")

    entry = physical_entry(e_entry, segments)
    if entry is None:
        raise fail(f"entry point {e_entry:#x} is outside every loadable segment")
    return Vmlinux(data=data, entry=entry, segments=tuple(segments))


def physical_entry(e_entry: int, segments: list[Segment]) -> int | None:
    for seg in segments:
        if seg.physical_address <= e_entry < seg.end:
            return e_entry
    for seg in segments:
        if seg.virtual_address <= e_entry < seg.virtual_address + seg.memory_size:
            return e_entry - seg.virtual_address + seg.physical_address
    return None


def load_vmlinux(memory: GuestMemory, vmlinux: Vmlinux) -> None:
    """Copy every PT_LOAD segment to guest RAM at its physical address."""
    for seg in vmlinux.segments:
        if not memory.contains(seg.physical_address, seg.memory_size):
            raise PyvmmError(
                f"the kernel needs guest memory up to {vmlinux.end / MiB:.0f} MiB "
                f"(a segment at {seg.physical_address:#x}), but the guest has "
                f"{memory.size / MiB:.0f} MiB; give it more --memory"
            )
    view = memoryview(vmlinux.data)
    for seg in vmlinux.segments:
        memory.write(seg.physical_address, view[seg.file_offset : seg.file_offset + seg.file_size])
        if seg.memory_size > seg.file_size:
            memory.fill(seg.physical_address + seg.file_size, seg.memory_size - seg.file_size)
