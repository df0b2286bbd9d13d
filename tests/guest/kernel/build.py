"""Build the test kernel into a bzImage (`build_test_kernel(output_dir) -> Path`).

The C and assembly sources are compiled with the system gcc into a flat
protected-mode image linked at 0x100000; the real-mode part (boot sector and
setup header) is written here, field by field, from
Documentation/arch/x86/boot.rst: protocol 2.15, a 64-bit entry point,
not relocatable, loaded high.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SETUP_SECTS = 1  # boot sector + one setup sector before the protected-mode code
LOAD_ADDRESS = 0x100000

# -g: tests/guest/test_gdb.py debugs testkernel.elf by its symbols and line numbers.
CFLAGS = ["-m64", "-O2", "-g", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-mno-red-zone", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-nostdlib",
          "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,-z,noexecstack"]


def setup_header(protected_size: int, init_size: int) -> bytes:
    setup = bytearray(512 * (SETUP_SECTS + 1))
    struct.pack_into("<B", setup, 0x1F1, SETUP_SECTS)
    struct.pack_into("<I", setup, 0x1F4, (protected_size + 15) // 16)   # syssize, in 16-byte units
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)                        # boot_flag
    struct.pack_into("<H", setup, 0x200, 0x66EB)                        # jump over the header
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)                        # protocol 2.15
    struct.pack_into("<B", setup, 0x211, 0x01)                          # loadflags: LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, LOAD_ADDRESS)                  # code32_start
    struct.pack_into("<I", setup, 0x22C, 0x37FFFFFF)                    # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)                      # kernel_alignment
    struct.pack_into("<B", setup, 0x234, 0)                             # not relocatable
    struct.pack_into("<H", setup, 0x236, 0x0001)                        # xloadflags: XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x238, 2047)                          # cmdline_size
    struct.pack_into("<Q", setup, 0x258, LOAD_ADDRESS)                  # pref_address
    struct.pack_into("<I", setup, 0x260, init_size)                     # init_size
    return bytes(setup)


def build_test_kernel(output_dir: Path) -> Path:
    if shutil.which("gcc") is None or shutil.which("objcopy") is None:
        pytest.skip("gcc and binutils are needed to build the test kernel: apt-get install gcc binutils")
    elf = output_dir / "testkernel.elf"
    flat = output_dir / "testkernel.bin"
    compiled = subprocess.run(["gcc", *CFLAGS, "-T", str(HERE / "kernel.ld"), "-o", str(elf),
                               str(HERE / "entry.S"), str(HERE / "testkernel.c")], capture_output=True, text=True)
    if compiled.returncode:
        raise RuntimeError(f"building the test kernel failed:\n{compiled.stderr}")
    subprocess.run(["objcopy", "-O", "binary", str(elf), str(flat)], check=True, capture_output=True)
    # init_size must cover .bss, which objcopy does not write out.
    symbols = subprocess.run(["nm", str(elf)], check=True, capture_output=True, text=True).stdout
    kernel_end = next(int(line.split()[0], 16) for line in symbols.splitlines() if line.endswith(" kernel_end"))
    protected = flat.read_bytes()
    protected += bytes(-len(protected) % 16)  # syssize counts 16-byte paragraphs
    init_size = max(len(protected), kernel_end - LOAD_ADDRESS)
    init_size = (init_size + 0xFFF) & ~0xFFF
    image = output_dir / "testkernel.bzImage"
    image.write_bytes(setup_header(len(protected), init_size) + protected)
    return image


if __name__ == "__main__":
    import sys

    print(build_test_kernel(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
