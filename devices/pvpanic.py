"""QEMU's ISA pvpanic device: the guest kernel reports a panic to the VMM.

One I/O port (0x505, `layout.PVPANIC_PORT`; the DSDT describes it with
`_HID` "QEMU0001" so Linux's pvpanic driver binds to it). A read returns the
events the device supports; the guest writes the event that happened. A
PANICKED event calls the injected `panic()` callback, which is how a guest
panic becomes pyvmm's panic exit status. CRASH_LOADED (the guest is about to
run a kdump kernel, so it is not dead yet) only calls the optional
`crash_loaded()` callback.
"""

from __future__ import annotations

from collections.abc import Callable

PANICKED = 0x01
CRASH_LOADED = 0x02
SUPPORTED_EVENTS = PANICKED | CRASH_LOADED


class PvPanic:
    def __init__(
        self,
        panic: Callable[[], None],
        *,
        crash_loaded: Callable[[], None] | None = None,
    ) -> None:
        self._panic = panic
        self._crash_loaded = crash_loaded
        self.events: list[int] = []  # what the guest reported, for --stats and tests

    def read(self, offset: int, size: int) -> int:
        # Linux reads this to learn which events it may send; bits we do not
        # advertise (like 6.x's SHUTDOWN) it will not use.
        return SUPPORTED_EVENTS

    def write(self, offset: int, size: int, value: int) -> None:
        events = value & SUPPORTED_EVENTS  # unsupported bits are ignored, as in QEMU
        if not events:
            return
        self.events.append(events)
        if events & PANICKED:
            self._panic()
        elif events & CRASH_LOADED and self._crash_loaded is not None:
            self._crash_loaded()
