"""`pyvmm check`: what this host offers, accelerator by accelerator."""

from __future__ import annotations

from collections.abc import Callable

from vmm.accel_select import kvm_device_path
from vmm.errors import PyvmmError

# Capabilities worth showing, by name (numbers from vmm/kvm/uapi.py); the
# required ones are checked on open.
_CAPABILITIES = (
    "KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID",
    "KVM_CAP_PIT2", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD",
    "KVM_CAP_SET_IDENTITY_MAP_ADDR", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_MAX_VCPUS",
)


def report(echo: Callable[[str], None]) -> bool:
    """Print one line per fact; True when at least one accelerator can run guests."""
    kvm_ok = _report_kvm(echo)
    tcg_ok = _report_tcg(echo)
    if kvm_ok:
        from vmm.kvm import quirks

        able, why = quirks.can_run_linux()
        echo(f"--accel auto: kvm{'' if able else f' for flat guests; tcg for Linux ({why})'}")
    elif tcg_ok:
        echo("--accel auto: tcg")
    return kvm_ok or tcg_ok


def _report_kvm(echo: Callable[[str], None]) -> bool:
    path = kvm_device_path()
    try:
        from vmm.kvm import uapi
        from vmm.kvm.fd import KvmSystem

        system = KvmSystem(path)
    except PyvmmError as err:
        echo(f"kvm: unavailable: {err}")
        return False
    try:
        echo(f"kvm: available ({path}, API version {system.api_version})")
        for name in _CAPABILITIES:
            echo(f"  {name:<30} {system.check_extension(getattr(uapi, name))}")
        from vmm.kvm import quirks

        if quirks.is_kvm_pvm():
            echo("  note: this KVM is kvm_pvm (software-based): small guests run, Linux cannot")
    finally:
        system.close()
    return True


def _report_tcg(echo: Callable[[str], None]) -> bool:
    try:
        from vmm.tcg.unicorn_lib import REQUIRED_VERSION
    except PyvmmError as err:
        echo(f"tcg: unavailable: {err}")
        return False
    echo(f"tcg: available (Unicorn {REQUIRED_VERSION}, QEMU's TCG)")
    return True
