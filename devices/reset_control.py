"""Ports 0xcf8-0xcff: no PCI configuration space, but the chipset's reset control register.

pyvmm has no PCI host bridge, so the configuration mechanism's address and
data ports read as all ones (Linux reads back its 0x80000000 probe address,
sees all ones and decides there is no type-1 access, nor type 2) and writes
to them vanish.

Port 0xcf9, a byte inside that range, is the reset control register of
Intel's chipsets (RST_CNT; QEMU's PIIX and ICH9 model it too): a write that
sets RST_CPU (bit 2) resets the machine, with SYS_RST (bit 1) and FULL_RST
(bit 3) choosing how hard. Linux's `reboot=pci` writes `cf9 | 2`, then
`cf9 | 6`; pyvmm's reset stub (boot/reset_stub.py) writes 0x0e. Reads return
the last SYS_RST/FULL_RST bits written, as the chipset does. The device
reports the reset through an injected callback.
"""

from __future__ import annotations

from collections.abc import Callable

from vmm.layout import PCI_CONFIG_PORT, RESET_CONTROL_PORT

RESET_CONTROL_OFFSET = RESET_CONTROL_PORT - PCI_CONFIG_PORT
SYS_RST = 1 << 1
RST_CPU = 1 << 2
FULL_RST = 1 << 3


class PciConfigPortsWithResetControl:
    """Registered on the 8 ports from 0xcf8."""

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        if offset == RESET_CONTROL_OFFSET and size == 1:
            return self.value
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != RESET_CONTROL_OFFSET or size != 1:
            return  # a PCI configuration address or data access: nothing answers
        if value & RST_CPU:
            self._reset()
        self.value = value & (SYS_RST | FULL_RST)
