"""What a device plugs into while the machine is built.

Every device file ends with a `plug(board)` function that puts the device
where it sits on a PC: its ports or MMIO window on the buses, its interrupt
line, its description in the DSDT, and its callbacks wired to the machine
(stop with an exit status, the host console). The builder (vmm/builder.py)
makes one `Board` and calls the functions in its device list, DEVICES, in
order; adding a device is its file plus one line in that list.

The device classes themselves stay plain state machines with injected
callbacks, testable without a board.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vmm.bus import Bus, IrqLine
from vmm.memory import GuestMemory


@dataclass
class Board:
    pio: Bus
    mmio: Bus
    memory: GuestMemory
    cpus: int
    # ISA IRQ or GSI n -> its interrupt line (a NullIrqLine on machines without
    # interrupt controllers, which `boot --flat` machines are).
    irq: Callable[[int], IrqLine]
    # End the run with this exit status (vmm/exit_status.py) and reason ("" for none).
    stop: Callable[[int, str], None]
    # A reset line pulled, and which one (vmm/guest_reset.py decides what that means).
    reset: Callable[[str], None]
    # The host console: guest output, and "the guest can take input again".
    console_write: Callable[[bytes], object]
    console_room_available: Callable[[], object]
    started: float  # when pyvmm started, on devices.boot_timer's clock
    # Where the serial port's output goes, when not straight to console_write: a
    # firmware boot watches it for "No bootable device." (boot/firmware.py).
    serial_write: Callable[[bytes], object] | None = None
    # The devices' entries in the DSDT's \_SB scope, in plug order.
    acpi: list[bytes] = field(default_factory=list)
    # Who takes what the user types: the serial port, unless a later device
    # (virtio-console) takes over.
    console_input: Callable[[bytes], int] | None = None
    # Whether a person types that input at a terminal (not a pipe or a file).
    console_interactive: bool = False
    # One line of pyvmm's own for the user, on the console's notice stream.
    console_notice: Callable[[str], object] = lambda text: None
    # Whether the guest has written to the serial port (set by the serial port).
    serial_in_use: Callable[[], bool] = lambda: False
    # Set by the boot timer when the guest marks "userspace reached" (seconds since `started`).
    userspace_reached: float | None = None
