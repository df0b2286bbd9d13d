"""The software CPU: the same machine as on KVM, emulated by Unicorn (QEMU's TCG).

Importing this package fails with a `PyvmmError` when Unicorn is missing or
is not the exact version pyvmm relies on (vmm/tcg/unicorn_lib.py).
"""

from vmm.tcg.accel import TcgAccelerator

__all__ = ["TcgAccelerator"]
