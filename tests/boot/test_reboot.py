"""Every way the Debian kernel reboots or panics ends the VM with its documented status.

Each `reboot=` value takes Linux down a different reset path (ACPI reset
register, i8042 pulse, triple fault, port 0xcf9, a jump to the reset vector
for bios and efi); without `reboot=` it uses the ACPI register. The command
lines are the user's own, so pyvmm adds `panic=-1 reboot=panic_warm`
(boot/reboot_params.py). `--accel auto`: the software CPU on hosts whose
KVM cannot run Linux; tests/guest/test_reset.py covers each mechanism on KVM.
"""

from __future__ import annotations

import pytest

from tests.boot.session import PROMPT, GuestSession

REBOOTS = {  # reboot= value: exit status, what pyvmm says on stderr
    "acpi": (7, "through the ACPI reset register"),
    "kbd": (7, "through the i8042's reset line"),
    "triple": (3, "the guest triple-faulted"),
    "pci": (7, "through a chipset reset register, port 0x92 or 0xcf9"),
    "bios": (7, "through a chipset reset register, port 0x92 or 0xcf9"),  # the reset stub at F000:FFF0
    "efi": (7, "through a chipset reset register, port 0x92 or 0xcf9"),  # no EFI: falls back to bios
    None: (7, "through the ACPI reset register"),
}


def boot(linux_assets, cmdline: str) -> GuestSession:
    # Two vCPUs: a reset from any CPU ends the VM, and the second CPU, waiting
    # for its SIPI while the first boots, is not taken for a stuck one.
    return GuestSession("--kernel", str(linux_assets.kernel), "--initrd", str(linux_assets.initrd),
                        "--cmdline", cmdline, "--memory", "256M", "--cpus", "2")


@pytest.mark.parametrize("reboot", REBOOTS, ids=lambda value: f"reboot={value or '(none)'}")
def test_each_reboot_method_ends_the_vm(linux_assets, reboot):
    status, message = REBOOTS[reboot]
    guest = boot(linux_assets, "console=ttyS0" + (f" reboot={reboot}" if reboot else ""))
    try:
        guest.expect(PROMPT)
        guest.send("reboot -f")
        exit_status, stderr = guest.wait()
    finally:
        guest.close()
    assert exit_status == status, stderr
    assert message in stderr
    assert "looks stuck" not in stderr


@pytest.mark.parametrize("reboot", [None, "triple"], ids=["reboot=(none)", "reboot=triple"])
def test_a_panic_without_pvpanic_or_panic_param_ends_the_vm_as_a_panic(linux_assets, reboot):
    # The initramfs would load the pvpanic driver: the kernel refuses it here.
    cmdline = "console=ttyS0 module_blacklist=pvpanic_mmio" + (f" reboot={reboot}" if reboot else "")
    guest = boot(linux_assets, cmdline)
    try:
        guest.expect(PROMPT)
        guest.send("echo c > /proc/sysrq-trigger")
        guest.expect("Kernel panic - not syncing")
        exit_status, stderr = guest.wait()
    finally:
        guest.close()
    assert b"Module pvpanic_mmio is blacklisted" in guest.output
    assert exit_status == 4, stderr
    assert "the guest kernel panicked (and " in stderr  # learnt from the reset, not from pvpanic
