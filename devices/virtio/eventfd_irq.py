"""An interrupt line through a KVM irqfd with a resample eventfd: level-triggered, without ioctls.

Writing the trigger eventfd asserts the GSI from inside the kernel; it stays
asserted until the guest's EOI, when KVM lowers it and signals the resample
eventfd. The I/O loop then asks the device whether it still wants service
(its InterruptStatus is not zero) and, if so, asserts the line again. That
is the level-triggered behaviour the DSDT promises, with no exit to the VMM
on the interrupt path and no interrupt lost between an acknowledgement and
the EOI.
"""

from __future__ import annotations

import os
from collections.abc import Callable


class ResamplingIrqLine:
    def __init__(self, trigger_fd: int, resample_fd: int, loop,
                 still_pending: Callable[[], bool] = lambda: False) -> None:
        self.trigger_fd = trigger_fd
        self.resample_fd = resample_fd
        self.still_pending = still_pending
        loop.add_reader(resample_fd, self._resampled)

    def set_level(self, high: bool) -> None:
        # Lowering is the EOI's job (KVM does it); the device only ever raises.
        if high:
            self._trigger()

    def pulse(self) -> None:
        self._trigger()

    def _trigger(self) -> None:
        try:
            os.eventfd_write(self.trigger_fd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: the line is being raised anyway

    def _resampled(self) -> None:
        try:
            os.eventfd_read(self.resample_fd)
        except BlockingIOError:
            return
        if self.still_pending():
            self._trigger()
