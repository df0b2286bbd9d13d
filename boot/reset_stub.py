"""The reset stub: what sits at the reset vector when the machine has no firmware.

On a PC the CPU leaves reset at 0xFFFFFFF0, in the firmware flash just below
4 GiB, and real-mode code that wants a reset jumps to F000:FFF0 (0xFFFF0),
where the firmware is copied below 1 MiB. Linux's `reboot=bios` does that
jump, and so does its default reboot on a hardware-reduced ACPI machine like
pyvmm's (it tries EFI, which is absent, then BIOS); the EFI fallback ends
there too. With nothing at those addresses the vCPU would run whatever bytes
are there forever.

When pyvmm boots a kernel directly there is no firmware, so it puts this
stub at both places: it asks the chipset for a reset through the reset
control register (port 0xcf9, devices/legacy.py), which ends the VM
with the reboot status, as any other reset does. A machine that loads
firmware puts the firmware there instead.

The stub assembles to the same instructions in 16-, 32- and 64-bit code
(byte registers only, `out dx, al`), so it works however the guest got there:

    cli
    mov dl, 0xf9
    mov dh, 0x0c        ; dx = 0xcf9
    mov al, 0x0e        ; FULL_RST | RST_CPU | SYS_RST
    out dx, al
1:  hlt                 ; not reached: the VM has ended
    jmp 1b
"""

from __future__ import annotations

from devices.legacy import (
    RESET_CONTROL_FULL_RST,
    RESET_CONTROL_PORT,
    RESET_CONTROL_RST_CPU,
    RESET_CONTROL_SYS_RST,
)
from vmm.layout import FIRMWARE_AREA_END, REAL_MODE_RESET_VECTOR, RESET_VECTOR
from vmm.memory import GuestMemory

RESET_STUB = bytes([
    0xFA,                                    # cli
    0xB2, RESET_CONTROL_PORT & 0xFF,         # mov dl, 0xf9
    0xB6, RESET_CONTROL_PORT >> 8,           # mov dh, 0x0c
    0xB0, RESET_CONTROL_FULL_RST | RESET_CONTROL_RST_CPU | RESET_CONTROL_SYS_RST,  # mov al, 0x0e
    0xEE,                                    # out dx, al
    0xF4,                                    # hlt
    0xEB, 0xFD,                              # jmp back to the hlt
])
PAGE = 0x1000


def install_reset_stub(memory: GuestMemory) -> None:
    """Put the stub at F000:FFF0 in low RAM and at 0xFFFFFFF0, in a one-page firmware area
    (before the accelerator maps memory)."""
    memory.write(REAL_MODE_RESET_VECTOR, RESET_STUB)
    page = bytearray(PAGE)
    offset = RESET_VECTOR - (FIRMWARE_AREA_END - PAGE)
    page[offset:offset + len(RESET_STUB)] = RESET_STUB
    memory.add_firmware(FIRMWARE_AREA_END - PAGE, bytes(page))
