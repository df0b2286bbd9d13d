"""The KVM half of `pyvmm check`: what this host's /dev/kvm offers."""

from __future__ import annotations

from collections.abc import Callable

from vmm.errors import PyvmmError
from vmm.kvm import quirks, uapi
from vmm.kvm.fd import KvmSystem

# Capabilities worth showing, by name (numbers from vmm/kvm/uapi.py); the
# required ones are checked on open.
_CAPABILITIES = (
    "KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID",
    "KVM_CAP_PIT2", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD",
    "KVM_CAP_SET_IDENTITY_MAP_ADDR", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_MAX_VCPUS",
)


def report(path: str, echo: Callable[[str], None]) -> tuple[bool, str] | None:
    """Print one line per fact about the KVM at `path`.

    Returns None when it cannot be used, else `can_run_linux()`'s answer: whether
    a Linux kernel boots on it, and if not, why.
    """
    try:
        system = KvmSystem(path)
    except PyvmmError as err:
        echo(f"kvm: unavailable: {err}")
        return None
    try:
        echo(f"kvm: available ({path}, API version {system.api_version})")
        for name in _CAPABILITIES:
            echo(f"  {name:<30} {system.check_extension(getattr(uapi, name))}")
        if quirks.is_kvm_pvm():
            echo("  note: this KVM is kvm_pvm (software-based): small guests run, Linux cannot")
    finally:
        system.close()
    return quirks.can_run_linux()
