"""Mutated bzImage and ELF kernels through the Linux loader and `pyvmm boot`.

Seeds: an ELF vmlinux, and bzImages carrying it compressed as the kernel
build does (gzip, lz4, zstd, xz, uncompressed). Each case damages the boot
protocol header, the ELF header or program headers, the compressed payload,
or truncates the file, then loads it as `pyvmm boot` does (host-side
decompression, and the guest-decompression path), in 64 MiB of guest RAM.

Pass: the loader either hands back a boot state or refuses with a
`PyvmmError` (one line on stderr), within a time bound; a few cases also
go through the real CLI, with --timeout, and must end without a traceback.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from boot.linux import load_linux
from tests.assets import compress_like_kernel, make_bzimage, make_vmlinux
from tests.fuzzing import Hang, fuzz_cases, time_bound
from tests.helpers import REPO
from vmm.errors import PyvmmError
from vmm.memory import GuestMemory

SUITE_CASES = 150
CLI_CASES = 4
LOAD_BOUND = 20.0
MiB = 1 << 20

# Code at the entry: write 0x2a to the debug-exit port (an image that loads and runs says so).
ENTRY_CODE = b"\xb0\x2a\xe6\xf4" + b"\xf4" * 12
VMLINUX = make_vmlinux([(0x100_0000, ENTRY_CODE + bytes(range(256)) * 32, 0x20_0000)], entry=0x100_0000,
                       virtual_offset=0xFFFF_FFFF_8000_0000)
SEEDS = {"vmlinux": VMLINUX} | {
    f"bzImage-{method}": make_bzimage(compress_like_kernel(VMLINUX, method))
    for method in ("gzip", "lz4", "zstd", "xz", "uncompressed")}
SETUP_HEADER = (0x1F1, 0x270)  # the boot protocol's setup header
ELF_HEADERS = (0, 64 + 56)  # the ELF header and the one program header


def mutate(data: bytearray, rng) -> list[str]:
    done = []
    is_elf = data[:4] == b"\x7fELF"
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["header", "header", "payload", "bytes", "truncate"])
        if kind == "header":
            start, end = ELF_HEADERS if is_elf else SETUP_HEADER
            offset = rng.randrange(start, end)
            width = rng.choice([1, 2, 4, 8])
            value = rng.choice([0, 1, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, (1 << 64) - 1, rng.getrandbits(64)])
            piece = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            data[offset:offset + width] = piece[:max(0, len(data) - offset)]
            done.append(f"{width} bytes at {offset:#x}")
        elif kind == "payload" and not is_elf and len(data) > 0x1000:
            setup = (data[0x1F1] or 4) * 512 + 512
            start = setup + struct.unpack_from("<I", data, 0x248)[0] if len(data) > 0x250 else setup
            for _ in range(rng.randint(1, 8)):
                position = rng.randrange(min(start, len(data) - 1), len(data))
                data[position] = rng.getrandbits(8)
            done.append("payload bytes")
        elif kind == "bytes":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            done.append("random bytes")
        elif kind == "truncate":
            del data[rng.randrange(1, len(data)):]
            done.append(f"truncated to {len(data)}")
    return done


def mutated_kernels(tmp_path, name: str, cases: int):
    for label, rng in fuzz_cases(name, cases):
        seed = rng.choice(sorted(SEEDS))
        data = bytearray(SEEDS[seed])
        damage = mutate(data, rng)
        path = tmp_path / "kernel"
        path.write_bytes(data)
        yield f"{label}: {seed} with {', '.join(damage)}", path, rng


def test_mutated_kernels_load_or_are_refused(tmp_path):
    loaded = refused = 0
    memory = GuestMemory(64 * MiB)
    try:
        for label, path, rng in mutated_kernels(tmp_path, "kernel-load", SUITE_CASES):
            try:
                with time_bound(LOAD_BOUND, label):
                    load_linux(memory, path, None, "console=ttyS0", 0, direct=rng.random() < 0.8)
                loaded += 1
            except Hang:
                raise
            except PyvmmError:
                refused += 1
            except Exception as err:  # noqa: BLE001 - anything else would be a traceback for the user
                pytest.fail(f"{label}: {err!r}")
            memory.fill(0, 2 * MiB)  # low memory as a fresh machine has it
    finally:
        memory.close()
    assert refused and loaded  # the mutations reach both outcomes, or they test nothing


def test_mutated_kernels_through_pyvmm_boot(tmp_path):
    for label, path, _ in mutated_kernels(tmp_path, "kernel-boot", CLI_CASES):
        result = subprocess.run(
            [sys.executable, "-m", "vmm", "boot", "--kernel", str(path), "--accel", "tcg", "--memory", "64M",
             "--timeout", "5"], capture_output=True, stdin=subprocess.DEVNULL, cwd=REPO, timeout=120)
        stderr = result.stderr.decode(errors="replace")
        assert "Traceback" not in stderr, f"{label}:\n{stderr}"
        if result.returncode == 1:
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("pyvmm: "), f"{label}: {stderr!r}"
