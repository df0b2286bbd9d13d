"""QEMU's ISA pvpanic device: the guest kernel reports a panic to the VMM.

One I/O port (0x505, `PORT`; the DSDT describes it with
`_HID` "QEMU0001" so Linux's pvpanic driver binds to it). A read returns the
events the device supports; the guest writes the event that happened. A
PANICKED event calls the injected `panic()` callback, which is how a guest
panic becomes pyvmm's panic exit status. CRASH_LOADED (the guest is about to
run a kdump kernel, so it is not dead yet) only calls the optional
`crash_loaded()` callback.
"""

from __future__ import annotations

from collections.abc import Callable

from boot.acpi import aml
from devices.board import Board
from vmm import exit_status

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


# -- where it sits --------------------------------------------------------------------

PORT = 0x505  # QEMU's ISA pvpanic


def plug(board: Board) -> PvPanic:
    """A guest panic ends the run with the panic status."""
    pvpanic = PvPanic(lambda: board.stop(exit_status.GUEST_PANIC, "the guest kernel panicked"))
    board.pio.register(PORT, 1, pvpanic, "pvpanic")
    board.acpi.append(aml.device(
        "PEVT",
        aml.name("_HID", aml.string("QEMU0001")),
        aml.name("_CRS", aml.resource_template(aml.io(PORT, PORT, 0x01, 1))),
    ))
    return pvpanic
