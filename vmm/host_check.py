"""`pyvmm check`: what this host offers, accelerator by accelerator."""

from __future__ import annotations

from collections.abc import Callable

from vmm.accel_select import kvm_device_path
from vmm.errors import PyvmmError


def report(echo: Callable[[str], None]) -> bool:
    """Print one line per fact; True when at least one accelerator can run guests."""
    try:
        from vmm.kvm import check
    except PyvmmError as err:  # cffi missing, say
        echo(f"kvm: unavailable: {err}")
        kvm = None
    else:
        kvm = check.report(kvm_device_path(), echo)
    tcg_ok = _report_tcg(echo)
    if kvm is not None:
        able, why = kvm
        echo(f"--accel auto: kvm{'' if able else f' for flat guests; tcg for Linux ({why})'}")
    elif tcg_ok:
        echo("--accel auto: tcg")
    return kvm is not None or tcg_ok


def _report_tcg(echo: Callable[[str], None]) -> bool:
    try:
        from vmm.tcg.unicorn_lib import REQUIRED_VERSION
    except PyvmmError as err:
        echo(f"tcg: unavailable: {err}")
        return False
    echo(f"tcg: available (Unicorn {REQUIRED_VERSION}, QEMU's TCG)")
    return True
