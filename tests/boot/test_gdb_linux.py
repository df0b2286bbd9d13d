"""Debugging the Debian kernel with gdb, the way a kernel developer would (README, "Debugging the guest kernel").

Debian's image package ships System.map only as a stub (the real one is in
the 280 MB -dbg package), so the symbol's address comes from the same
kernel's /proc/kallsyms, read in a first boot with `nokaslr`: with KASLR off
the kernel runs at its link addresses, the ones System.map lists.
"""

from __future__ import annotations

import re

import pytest

from tests.boot.session import PROMPT, GuestSession
from tests.guest.gdb_driver import DebuggedVm, require_gdb

CMDLINE = "console=ttyS0 reboot=acpi panic=-1 nokaslr quiet"


@pytest.fixture(scope="module")
def start_kernel_address(linux_assets) -> int:
    session = GuestSession("--kernel", str(linux_assets.kernel), "--initrd", str(linux_assets.initrd),
                           "--accel", "tcg", "--cmdline", CMDLINE)
    try:
        session.expect(PROMPT)
        symbols = session.run("grep ' start_kernel$' /proc/kallsyms")
        session.send("poweroff")
        assert session.wait()[0] == 0
    finally:
        session.close()
    match = re.search(r"^([0-9a-f]{16}) T start_kernel$", symbols, re.M)
    assert match, symbols
    return int(match.group(1), 16)


def test_hardware_breakpoint_at_start_kernel_then_boot_to_init(linux_assets, start_kernel_address):
    require_gdb()
    vm = DebuggedVm("--kernel", str(linux_assets.kernel), "--initrd", str(linux_assets.initrd),
                    "--accel", "tcg", "--cmdline", CMDLINE)
    try:
        gdb = vm.start_gdb([f"hbreak *{start_kernel_address:#x}", "continue", "info registers rip",
                            "delete", "continue"])
        vm.session.expect(PROMPT)  # continue from the breakpoint booted to the initramfs's shell
        vm.session.send("poweroff")
        out = gdb.communicate(timeout=120)[0].decode(errors="replace")
        assert vm.wait() == 0
    finally:
        vm.close()
    assert f"Hardware assisted breakpoint 1 at {start_kernel_address:#x}" in out, out
    assert re.search(rf"^rip\s+{start_kernel_address:#x}\s", out, re.M), out
    assert "exited normally" in out, out
