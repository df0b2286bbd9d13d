"""Choosing the accelerator: `--accel auto|kvm|tcg`.

`auto` takes KVM when /dev/kvm opens and can run the guest; otherwise it
takes the software CPU, with a one-line notice saying why (which the machine
prints once the guest has loaded, so bad input still gets exactly one line). The device path
can be overridden (`PYVMM_KVM_DEVICE`), which is also how tests pretend a
host has no KVM.
"""

from __future__ import annotations

import os

from vmm.accel import Accelerator
from vmm.config import MachineConfig
from vmm.errors import PyvmmError

ACCELERATORS = ("auto", "kvm", "tcg")


def kvm_device_path() -> str:
    return os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm")


def open_tcg() -> Accelerator:
    try:
        from vmm.tcg import TcgAccelerator
    except ImportError as err:
        raise PyvmmError(f"the software CPU is unavailable: {err}") from None
    return TcgAccelerator()


def open_accelerator(config: MachineConfig) -> tuple[Accelerator, str]:
    """The accelerator to use, and a notice for the user when `auto` had to fall back."""
    if config.accel not in ACCELERATORS:
        raise PyvmmError(f"unknown accelerator {config.accel!r}: choose one of {', '.join(ACCELERATORS)}")
    if config.accel == "tcg":
        return open_tcg(), ""
    if config.cpu_vendor is not None:  # (validate() refused it with --accel kvm)
        return open_tcg(), "using the software CPU: --cpu-vendor asks for it"

    from vmm.kvm.accel import KvmAccelerator
    from vmm.kvm.fd import KvmUnavailable

    try:
        kvm = KvmAccelerator(kvm_device_path())
    except KvmUnavailable as err:
        if config.accel == "kvm":
            raise
        return open_tcg(), f"using the software CPU: {err}"
    if config.accel == "auto" and config.is_linux:
        able, why = kvm.can_run_linux()
        if not able:
            kvm.close()
            return open_tcg(), f"using the software CPU: {why}"
    return kvm, ""
