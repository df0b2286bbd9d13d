"""Process exit statuses of `pyvmm boot`, documented in the README.

A guest that writes `v` to the debug-exit port makes pyvmm exit with `v`
itself, so these values can also come from such a guest; CI guests that need
to tell them apart should write values above 16. pyvmm never tells a host stop
by its value: the stop request says who asked (vmm/lifecycle.py).
"""

POWEROFF = 0  # the guest powered off (ACPI S5, debug-exit 0, HLT with nothing to wake it)
ERROR = 1  # pyvmm could not start or run the guest: bad input or a host problem
# 2: the command line was wrong (click's own status)
TRIPLE_FAULT = 3  # the guest triple-faulted (KVM_EXIT_SHUTDOWN)
GUEST_PANIC = 4  # the guest kernel panicked: pvpanic, or a warm reset after it (vmm/guest_reset.py)
EMULATION_FAILURE = 5  # the accelerator could not run a guest instruction
ENTRY_FAILURE = 6  # the accelerator refused to enter the guest (bad vCPU state)
RESET = 7  # the guest reset the machine (a reboot); pyvmm does not restart guests
NO_BOOTABLE_DEVICE = 8  # the firmware found nothing to boot on the disks ("No bootable device.")
TIMED_OUT = 124  # --timeout ran out, as timeout(1) exits
INTERRUPTED = 130  # Ctrl-C, SIGTERM or the Ctrl-A x escape
# The guest's output had nowhere to go: pyvmm's stdout was closed, or its reader exited
# (`pyvmm boot ... | head`). 128 + SIGPIPE, what a shell reports for a writer a broken pipe killed.
OUTPUT_CLOSED = 141
