"""The hardware-reduced ACPI sleep and reset registers (one byte each, port I/O).

The FADT points the guest at these (addresses in vmm/layout.py). Linux powers
off by writing SLP_TYP (the value from the DSDT's _S5 package) with SLP_EN to
the sleep control register, and reboots by writing the FADT's reset value to
the reset register. The device only reports those through injected
callbacks; stopping the machine is not its business.
"""

from __future__ import annotations

from collections.abc import Callable

from devices.board import Board
from vmm import exit_status
from vmm.layout import (
    ACPI_RESET_VALUE,
    ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_CONTROL_SLP_EN,
    ACPI_SLEEP_CONTROL_SLP_TYP_SHIFT,
    ACPI_SLP_TYP_S5,
)

SLEEP_CONTROL, RESET = 0, 2  # offset 1, the sleep status register, reads 0: WAK_STS clear


class AcpiPowerManagement:
    """Registered on three consecutive ports: sleep control, sleep status, reset."""

    def __init__(self, power_off: Callable[[], None], reset: Callable[[], None]) -> None:
        self._power_off = power_off
        self._reset = reset

    def read(self, offset: int, size: int) -> int:
        # Nothing to report: the guest never sleeps and wakes here, and
        # WAK_STS is clear.
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == SLEEP_CONTROL and value & ACPI_SLEEP_CONTROL_SLP_EN:
            sleep_type = (value >> ACPI_SLEEP_CONTROL_SLP_TYP_SHIFT) & 0x7
            if sleep_type == ACPI_SLP_TYP_S5:
                self._power_off()
            # Other sleep states (S1-S4) are not offered in the DSDT; a guest
            # asking anyway keeps running, as on firmware without them.
        elif offset == RESET and value == ACPI_RESET_VALUE:
            self._reset()


# -- where it sits: the FADT's registers (vmm/layout.py, which the ACPI tables read too) --


def plug(board: Board) -> AcpiPowerManagement:
    pm = AcpiPowerManagement(power_off=lambda: board.stop(exit_status.POWEROFF, ""),
                             reset=lambda: board.reset("the ACPI reset register"))
    board.pio.register(ACPI_SLEEP_CONTROL_PORT, 3, pm, "acpi-pm")
    return pm
