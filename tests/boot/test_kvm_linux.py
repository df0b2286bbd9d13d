"""Linux on a KVM that cannot run it ends with a clear message, not a hang.

On the kvm_pvm development and CI hosts (PLATFORM.md) KVM cannot emulate the
`int3` of the kernel's alternatives self-test. `--accel kvm` must take the
kernel as far as it goes (through early boot, about 90 s here) and stop with
the emulation-failure status, the instruction bytes and what to do.
"""

from __future__ import annotations

import pytest

from tests.helpers import kvm_usable, run_pyvmm
from vmm.kvm import quirks


def test_linux_on_kvm_pvm_stops_with_emulation_failure(linux_assets):
    if reason := kvm_usable():
        pytest.skip(reason)
    if quirks.can_run_linux()[0]:
        pytest.skip("this host's KVM can run Linux; the kvm_pvm failure path cannot be shown here")
    result = run_pyvmm("boot", "--kernel", str(linux_assets.kernel), "--initrd", str(linux_assets.initrd),
                       "--accel", "kvm", timeout=600)
    stderr = result.stderr.decode()
    assert result.returncode == 5, stderr
    assert b"Linux version" in result.stdout  # the kernel really ran on KVM
    last = stderr.strip().splitlines()[-1]
    assert "could not emulate a guest instruction" in last
    assert "instruction bytes cc" in last          # the int3
    assert "boot it with --accel tcg" in last      # what to do
