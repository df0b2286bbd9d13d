"""The nested tier runs only when asked: PYVMM_KVM_TIER=ci or full (`make test-kvm`, `.ci/run`).

It boots an L1 Linux on QEMU's software CPU, which keeps both cores of a
development machine busy for minutes, so a plain `pytest` leaves it out.
kvm-unit-tests in L1 boots an L1 of its own for its whole comparison, so it
is in the full tier only. test_inside_l1.py is collected inside L1 only
(the tier runs it there).
"""

import os

from tests.helpers import host_is_qemu_tcg

TIER = os.environ.get("PYVMM_KVM_TIER")
collect_ignore = [] if TIER else ["test_kvm_tier.py", "test_gdb_linux_kvm.py"]
if TIER != "full":
    collect_ignore.append("test_kvm_unit_tests.py")
if not host_is_qemu_tcg():
    collect_ignore.append("test_inside_l1.py")
