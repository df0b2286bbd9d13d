"""The i8042 keyboard controller, with nothing plugged into it.

What pyvmm needs from it: Linux's i8042 driver must find a working
controller when it probes (self-test 0xAA -> 0x55, command byte read and
write, port enable/disable, the AUX loopback test), and a guest that resets
the machine the PC/AT way (command 0xFE, "pulse the reset line", which is
the last resort of Linux's `reboot`) must reach the VMM through the injected
`reset()` callback.

No keyboard or mouse is attached. Bytes the guest sends to either device get
the answer a controller gives when nothing is on the cable: 0xFE with the
timeout bit set in the status register, so PS/2 probes fail at once instead
of waiting for their timeouts.

Ports: data at 0x60 (offset 0), status (read) / command (write) at 0x64
(offset 4). Register the device over 0x60..0x64 with size 5 and it decodes
offsets 0 and 4; or register `data_port` and `command_port` as two one-port
devices, which leaves 0x61 (port B, the PIT speaker gate) to another device.

Interrupts: IRQ 1 (keyboard side) and IRQ 12 (AUX side) are levels that
follow "output buffer full" for bytes from that side, gated by the interrupt
enable bits of the command byte, as on the real controller.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from boot.acpi import aml
from devices.board import Board
from vmm.bus import IrqLine, NullIrqLine

DATA_OFFSET = 0
COMMAND_OFFSET = 4  # status when read

# Status register.
STATUS_OBF = 0x01  # output buffer full: a byte waits at port 0x60
STATUS_SYS = 0x04  # system flag: self-test passed (firmware did it at power-on)
STATUS_CMD = 0x08  # the last byte written went to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited (Linux warns "Keylock active" if clear)
STATUS_AUXDATA = 0x20  # the byte at 0x60 comes from the AUX (mouse) side
STATUS_TIMEOUT = 0x40

# Command byte ("controller configuration byte", CTR).
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
# What firmware leaves: keyboard interrupt on, scancode translation, SYS set.
INITIAL_CTR = CTR_KBDINT | CTR_SYS | CTR_XLATE

# Controller commands (written to port 0x64).
CMD_READ_CTR = 0x20  # 0x20-0x3F read internal RAM byte n (byte 0 is the CTR)
CMD_WRITE_CTR = 0x60  # 0x60-0x7F write internal RAM byte n
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT_PORT = 0xC0
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_BUFFER = 0xD2  # next data byte appears as if the keyboard sent it
CMD_WRITE_AUX_BUFFER = 0xD3  # the AUX loopback: next data byte comes back as AUX data
CMD_WRITE_AUX = 0xD4  # next data byte goes to the mouse
CMD_PULSE_FIRST = 0xF0  # 0xF0-0xFF pulse output-port lines; bit 0 is the reset line

SELF_TEST_OK = 0x55
INTERFACE_TEST_OK = 0x00
NO_DEVICE_REPLY = 0xFE

OUTPUT_PORT_RESET = 0x01  # output port bit 0 low holds the CPU in reset
OUTPUT_PORT_A20 = 0x02
INITIAL_OUTPUT_PORT = OUTPUT_PORT_RESET | OUTPUT_PORT_A20

RAM_SIZE = 32
# The real controller has a one-byte output buffer; a short queue is kinder
# to guests that issue commands back to back. Linux's flush gives up after
# reading 16 bytes ("no controller"), so stay well below that.
OUTPUT_QUEUE_LIMIT = 8

# Commands that take a parameter byte through the data port.
_COMMANDS_WITH_DATA = {
    CMD_WRITE_OUTPUT_PORT,
    CMD_WRITE_KBD_BUFFER,
    CMD_WRITE_AUX_BUFFER,
    CMD_WRITE_AUX,
}


class I8042:
    def __init__(
        self,
        reset: Callable[[], None],
        *,
        kbd_irq: IrqLine | None = None,
        aux_irq: IrqLine | None = None,
    ) -> None:
        self._reset = reset
        self._kbd_irq = kbd_irq or NullIrqLine()
        self._aux_irq = aux_irq or NullIrqLine()
        self._lock = threading.Lock()
        self._ram = bytearray(RAM_SIZE)
        self._ram[0] = INITIAL_CTR
        self._output: deque[tuple[int, int]] = deque()  # (byte, extra status bits)
        self._pending_command: int | None = None  # a command waiting for its data byte
        self._last_write_was_command = False
        self._output_port = INITIAL_OUTPUT_PORT
        self._irq_levels = (False, False)
        self.data_port = _PortView(self, DATA_OFFSET)
        self.command_port = _PortView(self, COMMAND_OFFSET)

    @property
    def command_byte(self) -> int:
        return self._ram[0]

    # Device protocol.

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA_OFFSET:
                value = self._read_data()
            elif offset == COMMAND_OFFSET:
                value = self._status()
            else:
                return (1 << (8 * size)) - 1  # 0x61-0x63 are not ours
            self._update_irqs()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        reset = False
        with self._lock:
            if offset == DATA_OFFSET:
                reset = self._write_data(value)
            elif offset == COMMAND_OFFSET:
                reset = self._write_command(value)
            self._update_irqs()
        if reset:
            self._reset()  # outside the lock: the machine may tear everything down

    # Registers.

    def _status(self) -> int:
        status = STATUS_UNLOCKED
        if self._ram[0] & CTR_SYS:
            status |= STATUS_SYS
        if self._last_write_was_command:
            status |= STATUS_CMD
        if self._output:
            status |= STATUS_OBF | self._output[0][1]
        return status

    def _read_data(self) -> int:
        if not self._output:
            return 0  # stale buffer contents on hardware
        return self._output.popleft()[0]

    def _reply(self, byte: int, status: int = 0) -> None:
        if len(self._output) < OUTPUT_QUEUE_LIMIT:
            self._output.append((byte, status))

    def _write_command(self, command: int) -> bool:
        """Run a controller command; True if it asks for a machine reset."""
        self._last_write_was_command = True
        self._pending_command = None
        ctr = self._ram[0]
        if CMD_READ_CTR <= command < CMD_READ_CTR + RAM_SIZE:
            self._reply(self._ram[command - CMD_READ_CTR])
        elif CMD_WRITE_CTR <= command < CMD_WRITE_CTR + RAM_SIZE:
            self._pending_command = command
        elif command == CMD_AUX_DISABLE:
            self._ram[0] = ctr | CTR_AUXDIS
        elif command == CMD_AUX_ENABLE:
            self._ram[0] = ctr & ~CTR_AUXDIS
        elif command in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._reply(INTERFACE_TEST_OK)  # the lines are fine, nothing is on them
        elif command == CMD_SELF_TEST:
            self._ram[0] = ctr | CTR_SYS
            self._reply(SELF_TEST_OK)
        elif command == CMD_KBD_DISABLE:
            self._ram[0] = ctr | CTR_KBDDIS
        elif command == CMD_KBD_ENABLE:
            self._ram[0] = ctr & ~CTR_KBDDIS
        elif command == CMD_READ_INPUT_PORT:
            self._reply(0x80)  # bit 7: keyboard not inhibited
        elif command == CMD_READ_OUTPUT_PORT:
            self._reply(self._output_port)
        elif command in _COMMANDS_WITH_DATA:
            self._pending_command = command
        elif command >= CMD_PULSE_FIRST:
            # The low nibble selects output lines to pulse low; bit 0 is reset.
            return not command & OUTPUT_PORT_RESET
        # Anything else: an unknown command, ignored as most controllers do.
        return False

    def _write_data(self, value: int) -> bool:
        """A byte at port 0x60: a command's parameter, or a byte for the keyboard."""
        self._last_write_was_command = False
        command, self._pending_command = self._pending_command, None
        if command is None:
            # To the keyboard, which is not there.
            self._ram[0] &= ~CTR_KBDDIS  # sending to the keyboard enables its port
            self._reply(NO_DEVICE_REPLY, STATUS_TIMEOUT)
        elif CMD_WRITE_CTR <= command < CMD_WRITE_CTR + RAM_SIZE:
            self._ram[command - CMD_WRITE_CTR] = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            return not value & OUTPUT_PORT_RESET
        elif command == CMD_WRITE_KBD_BUFFER:
            self._reply(value)
        elif command == CMD_WRITE_AUX_BUFFER:
            self._reply(value, STATUS_AUXDATA)
        elif command == CMD_WRITE_AUX:
            self._reply(NO_DEVICE_REPLY, STATUS_AUXDATA | STATUS_TIMEOUT)
        return False

    def _update_irqs(self) -> None:
        kbd = aux = False
        if self._output:
            from_aux = bool(self._output[0][1] & STATUS_AUXDATA)
            ctr = self._ram[0]
            kbd = not from_aux and bool(ctr & CTR_KBDINT)
            aux = from_aux and bool(ctr & CTR_AUXINT)
        if (kbd, aux) != self._irq_levels:
            if kbd != self._irq_levels[0]:
                self._kbd_irq.set_level(kbd)
            if aux != self._irq_levels[1]:
                self._aux_irq.set_level(aux)
            self._irq_levels = (kbd, aux)


class _PortView:
    """One of the controller's two ports as a one-port device of its own."""

    def __init__(self, controller: I8042, offset: int) -> None:
        self._controller = controller
        self._offset = offset

    def read(self, offset: int, size: int) -> int:
        return self._controller.read(self._offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._controller.write(self._offset, size, value)


# -- where it sits -------------------------------------------------------------------

# Data at 0x60, status/command at 0x64: registered separately (data_port,
# command_port), since 0x61 between them is the PIT's port B.
DATA_PORT = 0x60
COMMAND_PORT = 0x64
KEYBOARD_IRQ = 1
AUX_IRQ = 12


def plug(board: Board) -> I8042:
    """The keyboard controller, whose reset command resets the machine."""
    i8042 = I8042(lambda: board.reset("the i8042's reset line"), kbd_irq=board.irq(KEYBOARD_IRQ), aux_irq=board.irq(AUX_IRQ))
    board.pio.register(DATA_PORT, 1, i8042.data_port, "i8042-data")
    board.pio.register(COMMAND_PORT, 1, i8042.command_port, "i8042-cmd")
    board.acpi.append(aml.device(
        "PS2K",
        aml.name("_HID", aml.eisa_id("PNP0303")),
        aml.name("_CRS", aml.resource_template(
            aml.io(DATA_PORT, DATA_PORT, 0x01, 1),
            aml.io(COMMAND_PORT, COMMAND_PORT, 0x01, 1),
            aml.irq_no_flags(KEYBOARD_IRQ),
        )),
    ))
    return i8042
