"""The debug-exit port 0xf4 takes 1-, 2- and 4-byte writes; the status is the low byte.

QEMU's isa-debug-exit (iosize 4) accepts every width, and guests use them all:
kvm-unit-tests ends with `outl`, hand-written guests with `outb`. Each guest
here is a few real-mode bytes booted with `--flat`.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_pyvmm

OPERAND_SIZE = b"\x66"  # in real mode, turns a 16-bit instruction into its 32-bit form

GUESTS = {
    1: b"\xb0\x2a" + b"\xe6\xf4",                                    # mov $0x2a, %al;  out %al, $0xf4
    2: b"\xb8\x2b\x12" + b"\xe7\xf4",                                # mov $0x122b, %ax; out %ax, $0xf4
    4: OPERAND_SIZE + b"\xb8\x2c\x56\x34\x12" + OPERAND_SIZE + b"\xe7\xf4",  # outl 0x1234562c
}


@pytest.mark.parametrize("width, status", [(1, 0x2A), (2, 0x2B), (4, 0x2C)])
def test_debug_exit_at_each_width(tmp_path, accel, width, status):
    image = tmp_path / f"exit{width}.bin"
    image.write_bytes(GUESTS[width] + b"\xf4")  # hlt, never reached
    result = run_pyvmm("boot", "--flat", str(image), "--accel", accel, timeout=60)
    assert result.returncode == status, result.stderr
    assert result.stderr == b""
