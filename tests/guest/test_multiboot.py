"""Multiboot (v1) kernels through `pyvmm boot --kernel`, on every accelerator.

The kernel (tests/guest/asm/multiboot.S) prints its entry state and every
field of the information structure; the tests compare them with what the
Multiboot Specification and pyvmm's machine say it must be handed. A second
kernel (multiboot_bios.S) relies on the state a PC BIOS leaves (the timer
waking `sti; hlt` in real mode, the BIOS data area). Malformed headers, built
here byte by byte, are refused with one line.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from tests.guest.test_cli_errors import assert_one_line_error
from tests.helpers import GUEST_ASM, run_pyvmm

MEMORY_MIB = 256
KERNEL_BASE = 0x100000
REAL_MODE_KERNEL_BASE = 0x8000  # where kvm-unit-tests' real-mode test loads, too
MAGIC = 0x1BADB002
EXIT_STATUS = 0x21  # the kernel's last act: outl 0x12345621 to the debug-exit port


@pytest.fixture(scope="session")
def multiboot_kernels(tmp_path_factory):
    """{"elf": kernel loaded by its program headers, "address-fields": raw image with flag 16}."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU binutils (as, ld) is not installed: apt-get install binutils")
    out = tmp_path_factory.mktemp("multiboot")
    kernels = {}
    for name, defsym, oformat in (("elf", [], []),
                                  ("address-fields", ["--defsym", "ADDRESS_FIELDS=1"], ["--oformat", "binary"])):
        obj, image = out / f"{name}.o", out / f"{name}.img"
        subprocess.run(["as", "--32", *defsym, "-o", str(obj), str(GUEST_ASM / "multiboot.S")],
                       check=True, capture_output=True)
        subprocess.run(["ld", "-m", "elf_i386", "-N", f"-Ttext={KERNEL_BASE:#x}", "--no-warn-rwx-segments",
                        *oformat, "-o", str(image), str(obj)], check=True, capture_output=True)
        kernels[name] = image
    return kernels


@pytest.fixture(scope="session")
def bios_state_kernel(tmp_path_factory):
    """tests/guest/asm/multiboot_bios.S as an ELF linked below 1 MiB, where real-mode code can run."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU binutils (as, ld) is not installed: apt-get install binutils")
    out = tmp_path_factory.mktemp("multiboot_bios")
    obj, kernel = out / "bios.o", out / "bios.elf"
    subprocess.run(["as", "--32", "-o", str(obj), str(GUEST_ASM / "multiboot_bios.S")], check=True,
                   capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-N", f"-Ttext={REAL_MODE_KERNEL_BASE:#x}", "--no-warn-rwx-segments",
                    "-o", str(kernel), str(obj)], check=True, capture_output=True)
    return kernel


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def u64(high_low: str) -> int:
    """A 64-bit field the kernel printed as HIGH:LOW."""
    high, low = high_low.split(":")
    return int(high, 16) << 32 | int(low, 16)


@pytest.mark.parametrize("kind", ["elf", "address-fields"])
def test_kernel_is_handed_what_the_specification_promises(multiboot_kernels, accel, kind, tmp_path):
    module = tmp_path / "module.bin"
    module_bytes = bytes(range(256)) * 11 + b"tail"
    module.write_bytes(module_bytes)
    result = run_pyvmm("boot", "--kernel", str(multiboot_kernels[kind]), "--accel", accel,
                       "--memory", f"{MEMORY_MIB}M", "--cmdline", "console=none a=b  c",
                       "--initrd", str(module), timeout=60)
    assert result.returncode == EXIT_STATUS, result.stderr
    assert result.stderr == b""
    lines = result.stdout.decode().splitlines()

    entry = fields(lines[0])
    assert entry["eax"] == "2badb002"
    assert int(entry["cr0"], 16) & 0x8000_0001 == 1  # protected mode, paging off
    eflags = int(entry["eflags"], 16)
    assert eflags & (1 << 9) == 0 and eflags & (1 << 17) == 0  # IF and VM clear
    assert entry["cs_base"] == "00000000"  # code runs at its link address
    # Data segments are flat (the kernel read below 4 GiB through each of them
    # and lived); code and data selectors differ, both from the GDT.
    assert entry["cs"] != entry["ds"]
    assert entry["ds"] == entry["es"] == entry["fs"] == entry["gs"] == entry["ss"]

    info = fields(lines[1])
    flags = int(info["flags"], 16)
    for bit in (0, 2, 3, 6, 9):  # mem_*, cmdline, mods, mmap, boot loader name
        assert flags & (1 << bit), f"info flag {bit} missing"
    assert int(info["mem_lower"], 16) == 639  # KiB below the EBDA
    assert int(info["mem_upper"], 16) == (MEMORY_MIB - 1) * 1024  # KiB from 1 MiB up
    assert int(info["mods_count"], 16) == 1
    assert lines[2] == f"cmdline={multiboot_kernels[kind]} console=none a=b  c"  # argv[0] first, as GRUB
    assert lines[3] == "loader=pyvmm"

    mmap = [fields(line) for line in lines if line.startswith("mmap ")]
    assert int(info["mmap_length"], 16) == 24 * len(mmap)
    regions = [(u64(m["base"]), u64(m["length"]), int(m["type"], 16), int(m["size"], 16)) for m in mmap]
    assert all(size == 20 for *_, size in regions)
    ram = [(base, length) for base, length, kind_, _ in regions if kind_ == 1]
    assert ram == [(0, 639 * 1024), (0x100000, (MEMORY_MIB - 1) << 20)]
    reserved = [(base, length) for base, length, kind_, _ in regions if kind_ == 2]
    assert (0x9FC00, 0x100000 - 0x9FC00) in reserved  # EBDA, BIOS area, ACPI tables
    assert any(base <= 0xFEE00000 < base + length for base, length in reserved)  # the APICs

    module_line = fields(next(line for line in lines if line.startswith("module ")))
    start, end = int(module_line["start"], 16), int(module_line["end"], 16)
    assert start % 4096 == 0 and start >= KERNEL_BASE
    assert end - start == len(module_bytes)
    assert int(module_line["sum"], 16) == sum(module_bytes)
    assert module_line["name"] == str(module)


def test_no_cmdline_no_module(multiboot_kernels, accel):
    result = run_pyvmm("boot", "--kernel", str(multiboot_kernels["elf"]), "--accel", accel, timeout=60)
    assert result.returncode == EXIT_STATUS, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[2] == f"cmdline={multiboot_kernels['elf']}"
    assert int(fields(lines[1])["mods_count"], 16) == 0
    assert not any(line.startswith("module ") for line in lines)


def test_real_mode_kernel_is_woken_by_the_bios_timer(bios_state_kernel, accel):
    """The kernel waits in `sti; hlt` in real mode three times; the exit status says which check
    failed (0x22: no BIOS tick, 0x23/0x24: the BIOS data area's memory size or EBDA segment)."""
    result = run_pyvmm("boot", "--kernel", str(bios_state_kernel), "--accel", accel, timeout=60)
    assert result.returncode == EXIT_STATUS, (result.returncode, result.stderr)
    assert result.stdout == b"woken by the BIOS timer in real mode\n"  # through the BDA's COM1 port


def raw_kernel(flags: int = 0x10000, *, checksum: int | None = None, load: int = KERNEL_BASE,
               load_end: int = 0, bss_end: int = 0, entry: int | None = None, pad: int = 64) -> bytes:
    """A raw kernel image whose header (at offset 0) carries its load addresses."""
    checksum = -(MAGIC + flags) & 0xFFFF_FFFF if checksum is None else checksum
    entry = load + 32 if entry is None else entry
    header = struct.pack("<8I", MAGIC, flags, checksum, load, load, load_end, bss_end, entry)
    return header + b"\xf4" * pad  # hlt


@pytest.mark.parametrize("image, message", [
    (raw_kernel(checksum=0x1234), b"bad header checksum"),
    (raw_kernel(load=0x40000000), b"outside guest RAM"),
    (raw_kernel(load=0xC0001000), b"outside guest RAM"),  # the MMIO hole
    (raw_kernel(bss_end=KERNEL_BASE + (1 << 30)), b"outside guest RAM"),
    (raw_kernel(load=0x6000), b"overlaps the multiboot information pyvmm places at 0x1000-0x7000"),
    (raw_kernel(load=0x500), b"overlaps the entry GDT"),
    (raw_kernel(load=0x400), b"overlaps the interrupt vector table and BIOS data area"),
    (raw_kernel(load=0x1FFF0), b"overlaps the command line"),
    (raw_kernel(load=0xE0000), b"overlaps the BIOS area and ACPI tables"),
    (raw_kernel(entry=0x200000), b"entry_addr 0x200000 is outside the loaded image"),
    (raw_kernel(load_end=KERNEL_BASE + 0x100000), b"load_end_addr"),
    (raw_kernel(0x10000 | 1 << 5), b"requires features pyvmm does not know (flags 0x20)"),
    (raw_kernel(0)[:12] + b"\0" * 64, b"neither an ELF file nor a header with address fields"),
])
def test_malformed_header_refused_with_one_line(tmp_path, image, message):
    kernel = tmp_path / "kernel.img"
    kernel.write_bytes(image)
    result = run_pyvmm("boot", "--kernel", str(kernel), "--accel", "tcg", "--memory", "256M", timeout=60)
    assert result.returncode == 1
    assert_one_line_error(result, b"multiboot kernel", message)


def test_module_that_does_not_fit_is_refused(multiboot_kernels, tmp_path):
    module = tmp_path / "big.bin"
    module.write_bytes(bytes(4 << 20))
    result = run_pyvmm("boot", "--kernel", str(multiboot_kernels["elf"]), "--accel", "tcg",
                       "--memory", "4M", "--initrd", str(module), timeout=60)
    assert_one_line_error(result, b"module", b"does not fit")
