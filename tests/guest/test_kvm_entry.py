"""A vCPU state the hardware refuses (KVM_EXIT_FAIL_ENTRY) ends the run with one clear line, not a hang."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import HOST_LIMITATION
from tests.helpers import REPO, kvm_usable
from vmm.kvm import quirks

pytestmark = pytest.mark.kvm


def test_refused_entry_ends_with_its_status_and_reason(guest):
    if reason := kvm_usable():
        pytest.skip(reason)
    if quirks.is_kvm_pvm():
        pytest.skip(f"{HOST_LIMITATION} kvm_pvm runs guest ring 0 in software and makes no hardware "
                    "VM-entry checks; `make test-kvm` runs this test on a real KVM")
    result = subprocess.run([sys.executable, "-m", "tests.guest.bad_entry", str(guest("hlt"))], cwd=REPO,
                            capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 6, result.stderr
    assert re.fullmatch(rb"pyvmm: vCPU 0: the accelerator refused to enter the guest "
                        rb"\(hardware entry failure reason 0x[0-9a-f]+, RIP 0x10000\)\n", result.stderr), result.stderr
    assert result.stdout == b""
