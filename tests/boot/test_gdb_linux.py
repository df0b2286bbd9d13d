"""Debugging the Debian kernel with gdb, the way a kernel developer would (README, "Debugging the guest kernel").

The symbol's address comes from tests/boot/kernel_symbols.py (the package's
System.map is a stub). tests/nested/test_gdb_linux_kvm.py does the same on a
real KVM.
"""

from __future__ import annotations

import re

import pytest

from tests.boot.kernel_symbols import NOKASLR_CMDLINE, kernel_symbols
from tests.boot.session import PROMPT
from tests.guest.gdb_driver import DebuggedVm, require_gdb


@pytest.fixture(scope="module")
def start_kernel_address(linux_assets) -> int:
    return kernel_symbols(linux_assets, ["start_kernel"])["start_kernel"]


def test_hardware_breakpoint_at_start_kernel_then_boot_to_init(linux_assets, start_kernel_address):
    require_gdb()
    vm = DebuggedVm("--kernel", str(linux_assets.kernel), "--initrd", str(linux_assets.initrd),
                    "--accel", "tcg", "--cmdline", NOKASLR_CMDLINE)
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
