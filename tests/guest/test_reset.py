"""Every way a PC guest resets ends the VM with the reboot status (7), on each accelerator.

Linux's reboot methods each end in one of these (tests/boot/test_reboot.py
boots the real kernel with each `reboot=` value on the software CPU; Linux
cannot run on the development hosts' KVM, so there the mechanisms are
proven by these small guests).
"""

from __future__ import annotations

import struct

import pytest

from tests.helpers import run_pyvmm

RESETS = {  # port, value, what pyvmm names on stderr
    "acpi": (0x602, 0x42, "the ACPI reset register"),
    "i8042": (0x64, 0xFE, "the i8042's reset line"),
    "cf9": (0xCF9, 0x06, "a chipset reset register, port 0x92 or 0xcf9"),  # Linux's reboot=pci writes 0x02, then 0x06
    "port92": (0x92, 0x01, "a chipset reset register, port 0x92 or 0xcf9"),
}


@pytest.mark.parametrize("method", RESETS)
def test_each_reset_register_ends_the_vm_with_the_reboot_status(guest, accel, method, tmp_path):
    port, value, name = RESETS[method]
    image = tmp_path / f"reset_{method}.bin"
    code = bytearray(guest("reset_ports").read_bytes())
    struct.pack_into("<HB", code, 2, port, value)  # the `port` and `value` words after the first jmp
    image.write_bytes(code)
    result = run_pyvmm("boot", "--flat", str(image), "--accel", accel, timeout=60)
    assert result.returncode == 7, result.stderr
    assert result.stderr.decode().strip() == f"pyvmm: the guest asked for a reset (through {name})"


def test_a_write_to_0xcf9_without_the_reset_bit_does_not_reset(guest, accel, tmp_path):
    image = tmp_path / "cf9_no_reset.bin"
    code = bytearray(guest("reset_ports").read_bytes())
    struct.pack_into("<HB", code, 2, 0xCF9, 0x02)  # SYS_RST alone only chooses the kind of reset
    image.write_bytes(code)
    result = run_pyvmm("boot", "--flat", str(image), "--accel", accel, timeout=60)
    assert result.returncode == 0x77, result.stderr


@pytest.mark.parametrize("name", ["reset_vector", "reset_vector_32"])
def test_a_jump_to_the_reset_vector_resets_through_the_stub(guest, accel, name):
    # F000:FFF0 in real mode (Linux's reboot=bios and the EFI fallback), and
    # 0xFFFFFFF0 where a CPU leaves reset: with no firmware, the reset stub.
    result = run_pyvmm("boot", "--flat", str(guest(name)), "--accel", accel, timeout=60)
    assert result.returncode == 7, result.stderr
    assert b"the guest asked for a reset" in result.stderr
