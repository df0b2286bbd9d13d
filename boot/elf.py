"""ELF executables as pyvmm's loaders read them: the file header and the PT_LOAD segments.

One reader for both classes: ELF64 for a Linux vmlinux (boot/vmlinux.py),
ELF32 for a multiboot kernel (boot/multiboot.py). Only what loading needs
is read (the System V gABI's Elf32_Ehdr/Elf64_Ehdr and Elf32_Phdr/
Elf64_Phdr): the type, the machine, the entry point and each loadable
segment's file range and physical and virtual addresses. The file is the
user's and untrusted: every offset and size is checked against the file
before it is used, and anything wrong is an `ElfError` whose message is one
line saying what; the loaders put their own prefix on it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
MAX_PROGRAM_HEADERS = 64  # kernels have a handful; more is a corrupt header
MAX_PHYSICAL_ADDRESS = 1 << 52  # the architectural limit of x86-64 physical addresses


class ElfError(ValueError):
    """The file is not the ELF executable the loader needs; the message says why."""


class _Layout(NamedTuple):
    """Where an ELF class keeps the fields pyvmm reads."""

    bits: int
    header_size: int
    entry_and_phoff: struct.Struct  # e_entry, e_phoff, at offset 24
    phentsize_offset: int  # e_phentsize, then e_phnum
    phdr: struct.Struct  # p_type and the fields `_program_header` names


_LAYOUTS = {
    # Elf32_Phdr: p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz (then flags, align).
    ELFCLASS32: _Layout(32, 52, struct.Struct("<II"), 42, struct.Struct("<IIIIII8x")),
    # Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
    ELFCLASS64: _Layout(64, 64, struct.Struct("<QQ"), 54, struct.Struct("<I4xQQQQQ8x")),
}


def is_elf(data: bytes | memoryview) -> bool:
    return bytes(data[:4]) == ELF_MAGIC


class Segment(NamedTuple):
    file_offset: int
    physical_address: int
    virtual_address: int
    file_size: int
    memory_size: int

    @property
    def end(self) -> int:
        return self.physical_address + self.memory_size


class ElfExecutable(NamedTuple):
    entry: int  # a physical address (see physical_entry)
    segments: tuple[Segment, ...]


def read_executable(data: bytes | memoryview, elf_class: int, machine: int, machine_name: str,
                    file_size: int | None = None) -> ElfExecutable:
    """The loadable segments and physical entry point of a little-endian executable of
    `elf_class` built for `machine`; ElfError on anything else or anything malformed.

    `data` is the file, or its first bytes when `file_size` says how long the whole is
    (a file that is still being decompressed): the headers must lie in those bytes."""
    layout = _LAYOUTS[elf_class]
    if file_size is None:
        file_size = len(data)
    if len(data) < layout.header_size or not is_elf(data):
        raise ElfError("no ELF header")
    if data[4] != elf_class or data[5] != ELFDATA2LSB:
        raise ElfError(f"not a {layout.bits}-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != machine:
        raise ElfError(f"built for machine {e_machine}, not {machine_name}")
    if e_type != ET_EXEC:
        raise ElfError(f"not an executable (ELF type {e_type})")
    e_entry, e_phoff = layout.entry_and_phoff.unpack_from(data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, layout.phentsize_offset)
    if e_phentsize != layout.phdr.size or not 0 < e_phnum <= MAX_PROGRAM_HEADERS:
        raise ElfError(f"bad program header table ({e_phnum} entries of {e_phentsize} bytes)")
    if e_phoff + e_phnum * layout.phdr.size > len(data):
        if len(data) < file_size:
            raise ElfError(f"program header table lies past the file's first {len(data)} bytes")
        raise ElfError("program header table lies beyond the end of the file (truncated?)")
    segments = []
    for index in range(e_phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = layout.phdr.unpack_from(
            data, e_phoff + index * layout.phdr.size)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise ElfError(f"segment {index} has more file bytes than memory bytes")
        if p_offset + p_filesz > file_size:
            raise ElfError(f"segment {index} lies beyond the end of the file (truncated?)")
        if p_paddr + p_memsz > MAX_PHYSICAL_ADDRESS:
            raise ElfError(f"segment {index} has an impossible physical address {p_paddr:#x}")
        segments.append(Segment(p_offset, p_paddr, p_vaddr, p_filesz, p_memsz))
    if not segments:
        raise ElfError("no loadable segments")
    entry = physical_entry(e_entry, segments)
    if entry is None:
        raise ElfError(f"entry point {e_entry:#x} is outside every loadable segment")
    return ElfExecutable(entry, tuple(segments))


def physical_entry(e_entry: int, segments: list[Segment]) -> int | None:
    """The entry as a physical address: kernels link it as one, or as a virtual
    address inside a segment, translated through that segment."""
    for seg in segments:
        if seg.physical_address <= e_entry < seg.end:
            return e_entry
    for seg in segments:
        if seg.virtual_address <= e_entry < seg.virtual_address + seg.memory_size:
            return e_entry - seg.virtual_address + seg.physical_address
    return None
