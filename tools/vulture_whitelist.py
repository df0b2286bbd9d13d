"""Names vulture cannot see being used, for the dead-code check:

    pip install vulture
    vulture vmm devices boot tests bench tools/vulture_whitelist.py

prints nothing when there is no dead code (the tests count as callers). Only
names that something calls or reads by name belong here; this file is never
imported.
"""

# ruff: noqa: B018, F821
# Called by a framework: click commands, pytest's hook and marks, context
# managers' and hooks' required parameters.
create, convert_command, compare_command, snapshot, show_progress  # vmm/image/cli.py
pytest_runtest_makereport, call, pytestmark, prebuilt_dir, collect_ignore  # tests: pytest reads these
__getattr__  # vmm/image/__init__.py: the module's lazy attributes (PEP 562)
exc, exc_info, user_data  # __exit__ / Unicorn hook signatures
exit_loop_pio_write, exit_loop_pio_read, exit_loop_mmio_write, exit_loop_mmio_read  # called from exit_loop.c

# Read by name: --stats counters (vmm/virtio_setup.py), local APIC registers
# (devices/lapic.py's register table), the capabilities `pyvmm check` shows and
# the ioctl numbers and boot_params offsets the tests check against the kernel's.
_.requests, _.tx_packets, _.esr
KVM_CAP_IRQCHIP, KVM_CAP_SET_IDENTITY_MAP_ADDR, KVM_CAP_PIT2
KVM_GET_MSR_INDEX_LIST, KVM_GET_MSRS, KVM_GET_FPU, KVM_GET_MP_STATE, KVM_SET_MP_STATE, MIN_ALIGNMENT

# Written into C structures that the kernel or Unicorn reads (cffi), or kept
# alive for the code that runs from it (the stop hook's page, the page-fault hook).
_.fcw, _.mxcsr, _.immediate_exit, _._code_page, _._exception_hook
