"""The ACPI registers the FADT names: sleep control and status, reset, and the PM timer.

The FADT points the guest at these (addresses in vmm/layout.py). Linux powers
off by writing SLP_TYP (the value from the DSDT's _S5 package) with SLP_EN to
the sleep control register, and reboots by writing the FADT's reset value to
the reset register. The device only reports those through injected
callbacks; stopping the machine is not its business.

The power-management timer is the free-running 3.579545 MHz counter every PC
chipset has (ACPI 6.x, 4.8.3.3), here 24 bits wide (the FADT leaves
TMR_VAL_EXT clear, as QEMU's chipsets do). Linux calibrates the TSC against it
when nothing tells it the TSC's rate: an AMD CPU model has no CPUID leaf for
that, the PIT calibration needs a legacy PIC that hardware-reduced ACPI does
not have, and the quick one needs PIT reads faster than an emulated PIT
answers (vmm/tcg/cpuid.py). Linux then calibrates the local APIC timer against
the TSC, checks that against this timer, refines the TSC's rate a second later
against it, and watches the TSC with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from devices.board import Board
from devices.log_once import LogOnce
from vmm import exit_status
from vmm.layout import (
    ACPI_PM_TIMER_PORT,
    ACPI_RESET_VALUE,
    ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_CONTROL_SLP_EN,
    ACPI_SLEEP_CONTROL_SLP_TYP_SHIFT,
    ACPI_SLP_TYP_S5,
)

log = logging.getLogger(__name__)

PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFF_FFFF  # 24 bits; bits 24-31 of the register read 0
NS_PER_S = 1_000_000_000

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


class AcpiPmTimer:
    """The PM timer register (4 ports; 1-, 2- and 4-byte reads), counting from the injected clock.

    The count's 24-bit wrap would set TMR_STS and raise an SCI on a full ACPI
    machine; a hardware-reduced one has neither, and Linux does not ask for it.
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._odd = LogOnce(log, "ACPI PM timer")

    def read(self, offset: int, size: int) -> int:
        count = self._clock() * PM_TIMER_HZ // NS_PER_S & PM_TIMER_MASK
        return count >> (8 * offset) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self._odd("write", "write of %#x to the read-only timer ignored", value)


# -- where it sits: the FADT's registers (vmm/layout.py, which the ACPI tables read too) --


def plug(board: Board) -> AcpiPowerManagement:
    pm = AcpiPowerManagement(power_off=lambda: board.stop(exit_status.POWEROFF, ""),
                             reset=lambda: board.reset("the ACPI reset register"))
    board.pio.register(ACPI_SLEEP_CONTROL_PORT, 3, pm, "acpi-pm")
    board.pio.register(ACPI_PM_TIMER_PORT, 4, AcpiPmTimer(), "acpi-pm-timer")
    return pm
