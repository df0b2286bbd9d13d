"""boot/elf.py: one reader for ELF32 (multiboot) and ELF64 (vmlinux) executables, every field checked."""

from __future__ import annotations

import struct

import pytest

from boot.elf import ELFCLASS32, ELFCLASS64, EM_386, EM_X86_64, ElfError, read_executable
from boot.multiboot import load_multiboot
from boot.multiboot_header import HEADER_MAGIC, MultibootError, read_header
from tests.assets import make_vmlinux
from vmm.layout import MiB
from vmm.memory import GuestMemory

LOAD_ADDRESS = 0x10_0000
PHDR_OFFSET = 52  # right after the ELF32 header
CODE_OFFSET = 0x100


def elf32(entry: int = LOAD_ADDRESS, phoff: int = PHDR_OFFSET, filesz: int = 16, memsz: int = 32,
          machine: int = EM_386) -> bytes:
    """An i386 executable with one PT_LOAD of the bytes at CODE_OFFSET, and a multiboot header there."""
    header = (b"\x7fELF" + bytes([ELFCLASS32, 1, 1]) + bytes(9)
              + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, 52, 32, 1, 0, 0, 0))
    phdr = struct.pack("<8I", 1, CODE_OFFSET, LOAD_ADDRESS, LOAD_ADDRESS, filesz, memsz, 5, 0x1000)
    multiboot = struct.pack("<3I", HEADER_MAGIC, 0, -HEADER_MAGIC & 0xFFFF_FFFF)
    return (header + phdr).ljust(CODE_OFFSET, b"\0") + multiboot + b"\xf4" * 4


def test_an_elf32_executable_gives_its_segment_and_entry():
    executable = read_executable(elf32(entry=LOAD_ADDRESS + 12), ELFCLASS32, EM_386, "i386")
    [segment] = executable.segments
    assert (segment.file_offset, segment.physical_address, segment.file_size, segment.memory_size) == (
        CODE_OFFSET, LOAD_ADDRESS, 16, 32)
    assert executable.entry == LOAD_ADDRESS + 12


def test_an_elf64_executable_gives_its_segments_and_entry():
    data = make_vmlinux([(0x100_0000, b"\x90" * 16, 0x1000), (0x110_0000, b"D" * 8, 8)], entry=0x100_0000)
    executable = read_executable(data, ELFCLASS64, EM_X86_64, "x86-64")
    assert [(s.physical_address, s.file_size, s.memory_size) for s in executable.segments] == [
        (0x100_0000, 16, 0x1000), (0x110_0000, 8, 8)]
    assert executable.entry == 0x100_0000


@pytest.mark.parametrize(("data", "message"), [
    (elf32()[:40], "no ELF header"),
    (elf32(phoff=1 << 20), "program header table lies beyond the end of the file"),
    (elf32(filesz=1 << 20, memsz=1 << 20), "segment 0 lies beyond the end of the file"),
    (elf32(filesz=64, memsz=32), "segment 0 has more file bytes than memory bytes"),
    (elf32(entry=0x500), "entry point 0x500 is outside every loadable segment"),
    (elf32(machine=EM_X86_64), "built for machine 62, not i386"),
])
def test_a_malformed_elf32_is_one_error(data, message):
    with pytest.raises(ElfError, match=message):
        read_executable(data, ELFCLASS32, EM_386, "i386")


def test_each_reader_wants_its_own_class():
    with pytest.raises(ElfError, match="not a 64-bit little-endian ELF file"):
        read_executable(elf32().ljust(64, b"\0"), ELFCLASS64, EM_X86_64, "x86-64")
    with pytest.raises(ElfError, match="not a 32-bit little-endian ELF file"):
        read_executable(make_vmlinux([(0x100_0000, b"\x90", 1)], entry=0x100_0000), ELFCLASS32, EM_386, "i386")


def test_a_multiboot_kernel_whose_program_headers_lie_outside_the_file_is_refused(tmp_path):
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(elf32(phoff=1 << 20))
    memory = GuestMemory(16 * MiB)
    try:
        with pytest.raises(MultibootError) as refused:
            load_multiboot(memory, kernel, read_header(kernel), "", [])
    finally:
        memory.close()
    assert str(refused.value) == (f"multiboot kernel {kernel}: "
                                  "program header table lies beyond the end of the file (truncated?)")
