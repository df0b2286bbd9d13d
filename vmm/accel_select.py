"""Choosing the accelerator: `--accel auto|kvm`.

`auto` takes KVM when /dev/kvm opens and offers what pyvmm needs. The
device path can be overridden (`PYVMM_KVM_DEVICE`), which is also how tests
pretend a host has no KVM.
"""

from __future__ import annotations

import os

from vmm.accel import Accelerator
from vmm.errors import PyvmmError

ACCELERATORS = ("auto", "kvm")


def kvm_device_path(default: str = "/dev/kvm") -> str:
    return os.environ.get("PYVMM_KVM_DEVICE", default)


def open_accelerator(requested: str, kvm_device: str = "/dev/kvm") -> Accelerator:
    if requested not in ACCELERATORS:
        raise PyvmmError(f"unknown accelerator {requested!r}: choose one of {', '.join(ACCELERATORS)}")
    from vmm.kvm.accel import KvmAccelerator

    return KvmAccelerator(kvm_device_path(kvm_device))
