"""Kernel parameters that make every way a Linux guest ends reach pyvmm.

A kernel with no `panic=` waits forever after a panic, and one without the
pvpanic driver never tells the VMM about it. So, unless the command line
chooses for itself, pyvmm adds:

- `panic=-1`: reboot at once after a panic. Every reset path reaches pyvmm
  (vmm/guest_reset.py), so the VM ends.
- `reboot=panic_warm`: the reboot after a panic is a *warm* one. Linux's x86
  reset code (`native_machine_emergency_restart`) writes its reboot mode for
  the BIOS into the warm-boot flag at physical 0x472 before trying any reset
  method: 0x1234 for warm, 0 otherwise. When a reset comes, pyvmm reads the
  flag and tells a panic (warm) from an ordinary reboot (cold), whichever
  reset path the kernel took, without the guest's cooperation.

That test holds only while ordinary reboots are not warm too: it is off when
the command line asks for warm reboots (`reboot=w...`) or chooses another
mode for panics (`reboot=panic_...`). The parameters are added before a `--`,
after which the kernel hands everything to init.
"""

from __future__ import annotations

from typing import NamedTuple

from boot.kernel_params import insert_kernel_params, split_init_args

BIOS_RESET_FLAG_ADDRESS = 0x472  # in the BIOS data area
WARM_RESET_FLAG = 0x1234


class RebootParams(NamedTuple):
    cmdline: str
    # A warm reset (0x1234 at 0x472) means the kernel panicked.
    warm_reset_means_panic: bool


def _reboot_items(kernel_params: list[str]) -> list[str]:
    """Every comma-separated item of every `reboot=` parameter (the kernel applies them in order)."""
    return [item for param in kernel_params if param.startswith("reboot=")
            for item in param[len("reboot="):].split(",") if item]


def add_reboot_params(cmdline: str) -> RebootParams:
    params = split_init_args(cmdline)[0].split()
    items = _reboot_items(params)
    additions = []
    if not any(param.startswith("panic=") for param in params):
        additions.append("panic=-1")
    panic_modes = [item[len("panic_"):] for item in items if item.startswith("panic_")]
    if not panic_modes:
        additions.append("reboot=panic_warm")
        panic_modes = ["warm"]
    warm_reboots = any(item.startswith("w") for item in items)
    panics_warm = panic_modes[-1].startswith("w")
    return RebootParams(cmdline=insert_kernel_params(cmdline, additions),
                        warm_reset_means_panic=panics_warm and not warm_reboots)
