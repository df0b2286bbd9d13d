"""The nested tier runs only when asked: PYVMM_KVM_TIER=ci or full (`make test-kvm`, `.ci/run`).

It boots an L1 Linux on QEMU's software CPU, which keeps both cores of a
development machine busy for minutes, so a plain `pytest` leaves it out.
"""

import os

collect_ignore = [] if os.environ.get("PYVMM_KVM_TIER") else ["test_kvm_tier.py", "test_gdb_linux_kvm.py"]
