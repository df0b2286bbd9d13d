"""A 16550A UART, the PC's COM port, as a plain state machine.

The guest sees the eight registers of a 16550A at offsets 0-7. Transmitted
bytes leave at once through an injected `output(bytes)` writer. Bytes from
the host arrive through `receive()`.

Transmit path, and when the transmitter is empty again. There is no
baud-rate clock, but a transmitter is not empty the instant a byte is
written either: on a real line THRE stays clear for a character time or
more, far longer than a driver takes to fill the FIFO. Linux's 8250 driver
writes up to 16 bytes per THRE interrupt and, with nothing left, disables
the interrupt (an IER write). Were THR empty again at each write, the first
byte of every burst would raise the interrupt the driver is about to
disable, and the guest would take an interrupt for nothing (two per printed
line, half the interrupts of a printing guest). So bytes written to THR
leave at once, but the transmitter reports itself empty (the THRE
interrupt) only when the guest turns to any other register, or, for a
driver that writes THR and then waits for the interrupt without looking at
the chip, after TRANSMIT_BACKSTOP_NS (a thread that lives while
transmissions are outstanding). A guest can never read LSR with THRE or
TEMT clear: the read itself turns to another register.

Receive path, and why it has two stages. The guest-visible receive FIFO holds
16 bytes (1 with the FIFOs disabled, as on an 8250). Behind it sits a bounded
host-side buffer, which plays the part of the serial wire: whenever the guest
takes a byte out of the FIFO, the next byte moves in from the buffer.
`receive()` accepts only what fits in the buffer and returns how many bytes
it took, so a caller feeding a pipe can wait for room (`can_receive()`, or
the `room_available` callback) instead of losing input; a caller that cannot
wait may ask for the excess to be dropped, which the guest sees as an
overrun (LSR.OE) and which is counted.

Interrupts follow the 16550A's priority order in IIR (line status, received
data / character timeout, THR empty, modem status). The interrupt output is a
level: held high while an enabled interrupt is pending. As on a PC, the line
reaches the interrupt controller only while MCR.OUT2 is set and the chip is
not in loopback mode (loopback forces OUT2 inactive). Like QEMU, pyvmm resets
MCR with OUT2 set, the state firmware leaves the port in.

Threads: vCPU threads call read/write, the console thread calls receive; one
lock guards all state. The output writer and the IRQ line are called with the
lock held (the line, from the compiled path, with its own lock held), so
bytes leave in order and levels are never set out of order; neither may call
back into the UART.

On the software CPU the common-state accesses may be answered in C instead
(devices/uart_ports.py): `attach_compiled_ports` hands the registers over
whenever a locked section leaves them in a state the C hook handles, and
every locked section starts by taking them back, with the output the C hook
gathered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from boot.acpi import aml
from devices.board import Board
from vmm.bus import IrqLine

if TYPE_CHECKING:
    from devices.uart_ports import CompiledPorts

log = logging.getLogger(__name__)

# Register offsets from the base port.
# Several registers share an offset; LCR.DLAB and the access direction pick one.
RBR = THR = 0  # receive buffer (read) / transmit holding (write); the divisor's low byte with DLAB
IER = 1  # interrupt enable; the divisor's high byte with DLAB
IIR = FCR = 2  # interrupt identification (read) / FIFO control (write)
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER bits.
IER_RDI = 0x01  # received data available (and character timeout)
IER_THRI = 0x02  # transmit holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_MASK = 0x0F  # the upper four bits read as zero on a 16550A

# IIR values, highest priority first.
IIR_NO_INT = 0x01
IIR_RLSI = 0x06
IIR_RDI = 0x04
IIR_RX_TIMEOUT = 0x0C
IIR_THRI = 0x02
IIR_MSI = 0x00
IIR_FIFO_ENABLED = 0xC0

# FCR bits.
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_TRIGGER_MASK = 0xC0
RX_TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}

# LCR bits.
LCR_DLAB = 0x80

# MCR bits.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F  # bit 5 (auto flow control) is a 16750 feature

# LSR bits.
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR bits: four "delta" bits below the four input lines.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04  # trailing edge of ring indicator
MSR_DDCD = 0x08
MSR_DELTAS = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

HW_FIFO_SIZE = 16
# A transmitter the guest left busy, touching no other register since, reports itself
# empty after this long at most: what 16 bytes take on a real line at 9600 baud. (Longer
# would slow such a driver below a real line's speed; shorter wakes the thread more often
# while a guest prints, as Linux does, without need: its driver always looks again.)
TRANSMIT_BACKSTOP_NS = 16_000_000
DEFAULT_HOST_BUFFER = 4096
DEFAULT_DIVISOR = 12  # 9600 baud from the PC's 1.8432 MHz clock

# With nothing but a terminal on the far end, the modem inputs a cable would
# give: carrier detect, data set ready and clear to send, no ring.
DEFAULT_MODEM_INPUTS = MSR_DCD | MSR_DSR | MSR_CTS


class Uart16550:
    """The 16550A; register it on the PIO bus at COM1 (0x3f8) with size 8."""

    def __init__(
        self,
        irq: IrqLine,
        output: Callable[[bytes], None],
        *,
        host_buffer_size: int = DEFAULT_HOST_BUFFER,
        room_available: Callable[[], None] | None = None,
    ) -> None:
        if host_buffer_size < 1:
            raise ValueError("host_buffer_size must be at least 1")
        self._irq = irq
        self._output = output
        self._room_available = room_available
        self._host_buffer_size = host_buffer_size
        self._lock = threading.Lock()

        self._fifo: deque[int] = deque()  # what the guest can read now
        self._wire: deque[int] = deque()  # host bytes waiting for room in the FIFO
        self._host_waiting = False  # receive() turned bytes away; tell it about room

        self._backstop: threading.Thread | None = None  # see _run_backstop
        self._compiled: CompiledPorts | None = None  # see attach_compiled_ports
        self.overruns = 0  # bytes lost to a full receiver
        self.transmitted = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self._ier = 0
        self._lcr = 0
        self._mcr = MCR_OUT2
        self._lsr = LSR_THRE | LSR_TEMT
        self._msr = DEFAULT_MODEM_INPUTS
        self._scr = 0
        self._divisor = DEFAULT_DIVISOR
        self._fifo_enabled = False
        self._rx_trigger = 1
        self._thr_interrupt = False  # "THR became empty" waiting to be seen in IIR
        self._transmitting_since: int | None = None  # THR written, not reported empty yet (monotonic ns)
        self._irq_level = False

    # ---------------------------------------------------------------- guest side

    def read(self, offset: int, size: int) -> int:
        # The 16550A sits on an 8-bit bus: a wider access is a run of byte cycles.
        value = 0
        with self._lock:
            self._take_back()
            for index in range(size):
                value |= self._read_byte(offset + index) << (8 * index)
            self._update_irq()
            notify = self._take_room_notification()
            self._hand_over()
        if notify:
            notify()  # outside the lock: the host side may call receive() at once
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._take_back()
            for index in range(size):
                self._write_byte(offset + index, (value >> (8 * index)) & 0xFF)
            self._update_irq()
            notify = self._take_room_notification()
            self._hand_over()
        if notify:
            notify()

    def _read_byte(self, offset: int) -> int:
        if self._transmitting_since is not None:
            self._transmitter_empty()  # the guest turned to another register
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            return self._divisor & 0xFF if dlab else self._read_rbr()
        if offset == IER:
            return self._divisor >> 8 if dlab else self._ier
        if offset == IIR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            return self._read_msr()
        if offset == SCR:
            return self._scr
        return 0xFF  # outside the eight registers: nothing drives the bus

    def _write_byte(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if self._transmitting_since is not None and (offset != THR or dlab):
            self._transmitter_empty()  # the guest turned to another register
        if offset == RBR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif offset == IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif offset == IIR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only; writes to them (factory test modes) are ignored.

    # Transmit.

    def _write_thr(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            # Loopback: the transmitter feeds the receiver, nothing leaves the chip.
            self._push_rx(value)
        else:
            self._output(bytes((value,)))
            self.transmitted += 1
        # The write cleared the THRE interrupt; the transmitter says it is empty
        # again once the burst of writes is over (the module docstring says why).
        self._thr_interrupt = False
        if self._transmitting_since is None:
            self._transmitting_since = time.monotonic_ns()
            if self._backstop is None:
                self._backstop = threading.Thread(target=self._run_backstop, name="uart-transmitter",
                                                  daemon=True)
                self._backstop.start()

    def _transmitter_empty(self) -> None:
        self._transmitting_since = None
        self._thr_interrupt = True

    def _run_backstop(self) -> None:
        """Report the transmitter empty once it has been busy TRANSMIT_BACKSTOP_NS with
        the guest not looking; end once no byte was sent for that long (a printing guest
        keeps the thread, an idle one costs none). Not sooner: a printing guest spends
        most of its time between two bursts of THR writes, and a thread started for
        each burst cost more than the guest's writes. Each wake-up also sends on what
        the compiled port path gathered."""
        transmitted_at_last_look = None
        # Started by a transmission that has just begun: nothing to look at before this long
        # (nor to take back: a take hands the accesses to Python until the next grant).
        delay = TRANSMIT_BACKSTOP_NS
        while True:
            if delay > 0:
                time.sleep(delay / 1e9)
            with self._lock:
                self._take_back()
                since = self._transmitting_since
                if since is None:
                    if self.transmitted == transmitted_at_last_look:
                        self._backstop = None
                        self._hand_over()
                        return
                    delay = TRANSMIT_BACKSTOP_NS
                else:
                    delay = since + TRANSMIT_BACKSTOP_NS - time.monotonic_ns()
                    if delay <= 0:
                        self._transmitter_empty()
                        try:
                            self._update_irq()
                        except Exception:  # noqa: BLE001 - a stopped machine closed the line under us
                            log.debug("UART transmitter: the interrupt line is gone", exc_info=True)
                transmitted_at_last_look = self.transmitted
                self._hand_over()

    def _write_ier(self, value: int) -> None:
        value &= IER_MASK
        turned_on = value & ~self._ier
        self._ier = value
        if turned_on & IER_THRI:
            # Enabling THRI with THR empty raises the interrupt at once, as a real
            # 16550A and QEMU do; Linux's 8250 driver tests for this at start-up
            # and otherwise marks the port as buggy.
            self._thr_interrupt = True
        elif not value & IER_THRI:
            self._thr_interrupt = False

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE_FIFO)
        if enable != self._fifo_enabled:
            # Switching between FIFO and 8250 mode empties both FIFOs.
            self._fifo.clear()
            self._fifo_enabled = enable
        if enable:  # with FIFOs off, the other FCR bits have no effect
            if value & FCR_CLEAR_RX:
                self._fifo.clear()
            # FCR_CLEAR_TX: the transmit FIFO is always empty here.
            self._rx_trigger = RX_TRIGGER_LEVELS[value & FCR_TRIGGER_MASK]
        self._refill_fifo()  # bytes waiting on the wire move into the emptied FIFO

    def _write_mcr(self, value: int) -> None:
        was_loop = self._mcr & MCR_LOOP
        self._mcr = value & MCR_MASK
        self._set_modem_inputs(self._modem_inputs())
        if was_loop and not self._mcr & MCR_LOOP:
            self._refill_fifo()  # the wire is connected again

    # Receive.

    def _read_rbr(self) -> int:
        if not self._fifo:
            return 0  # reading an empty RBR returns stale data on hardware; 0 here
        value = self._fifo.popleft()
        self._refill_fifo()
        return value

    def _push_rx(self, value: int) -> None:
        if len(self._fifo) >= self._fifo_depth():
            self._overrun(1)
        else:
            self._fifo.append(value)

    def _overrun(self, count: int) -> None:
        self._lsr |= LSR_OE
        self.overruns += count

    def _fifo_depth(self) -> int:
        return HW_FIFO_SIZE if self._fifo_enabled else 1

    def _refill_fifo(self) -> None:
        if self._mcr & MCR_LOOP:
            return  # loopback disconnects the receiver from the wire
        depth = self._fifo_depth()
        while self._wire and len(self._fifo) < depth:
            self._fifo.append(self._wire.popleft())

    # Status registers.

    def _read_lsr(self) -> int:
        value = self._lsr
        if self._fifo:
            value |= LSR_DR
        # Reading LSR clears the error bits and with them the line status interrupt.
        self._lsr &= ~LSR_ERRORS
        return value

    def _read_msr(self) -> int:
        value = self._msr
        self._msr &= ~MSR_DELTAS  # reading MSR clears the deltas (and the interrupt)
        return value

    def _modem_inputs(self) -> int:
        if self._mcr & MCR_LOOP:
            # Loopback wires the outputs to the inputs: RTS->CTS, DTR->DSR,
            # OUT1->RI, OUT2->DCD.
            mcr = self._mcr
            return (
                (MSR_CTS if mcr & MCR_RTS else 0)
                | (MSR_DSR if mcr & MCR_DTR else 0)
                | (MSR_RI if mcr & MCR_OUT1 else 0)
                | (MSR_DCD if mcr & MCR_OUT2 else 0)
            )
        return DEFAULT_MODEM_INPUTS

    def _set_modem_inputs(self, lines: int) -> None:
        old = self._msr
        changed = (old ^ lines) & 0xF0
        deltas = 0
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        if old & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TERI  # only the falling edge of RI counts
        self._msr = lines | (old & MSR_DELTAS) | deltas

    # Interrupts.

    def _pending_interrupt(self) -> int:
        """The IIR interrupt ID that the guest would read now, by priority."""
        ier = self._ier
        if ier & IER_RLSI and self._lsr & LSR_ERRORS:
            return IIR_RLSI
        if ier & IER_RDI and self._fifo:
            if not self._fifo_enabled or len(self._fifo) >= self._rx_trigger:
                return IIR_RDI
            # Fewer bytes than the trigger level: hardware reports a character
            # timeout after four idle character times. Host bytes arrive with no
            # line timing, so the line is always idle: report it at once.
            return IIR_RX_TIMEOUT
        if ier & IER_THRI and self._thr_interrupt:
            return IIR_THRI
        if ier & IER_MSI and self._msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _read_iir(self) -> int:
        pending = self._pending_interrupt()
        if pending == IIR_THRI:
            # Reading IIR while it names THRE is how the guest acknowledges it.
            self._thr_interrupt = False
        return pending | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)

    def _update_irq(self) -> None:
        wired = self._mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
        level = wired and self._pending_interrupt() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

    # ----------------------------------------------------------------- host side

    def receive(self, data: bytes, *, drop_excess: bool = False) -> int:
        """Queue bytes from the host for the guest; return how many were taken.

        Bytes that do not fit are left to the caller, who should wait for
        `can_receive()` or the `room_available` callback. With `drop_excess`
        they are discarded instead and the guest sees an overrun.
        """
        with self._lock:
            self._take_back()
            taken = min(self._room(), len(data))
            self._wire.extend(data[:taken])
            if taken < len(data):
                if drop_excess:
                    self._overrun(len(data) - taken)
                else:
                    self._host_waiting = True
            self._refill_fifo()
            self._update_irq()
            self._hand_over()
        return taken

    def can_receive(self) -> bool:
        """Whether `receive()` would take at least one byte now."""
        with self._lock:
            return self._room() > 0

    def _room(self) -> int:
        # Free FIFO slots count too: the wire only queues once the FIFO is full
        # (or the receiver is in loopback and takes nothing from the wire).
        room = self._host_buffer_size - len(self._wire)
        if not self._mcr & MCR_LOOP:
            room += self._fifo_depth() - len(self._fifo)
        return room

    def _take_room_notification(self) -> Callable[[], None] | None:
        # Tell a waiting host once the buffer is half empty, not after every
        # byte: each notification costs the console thread a wakeup.
        if self._host_waiting and len(self._wire) <= self._host_buffer_size // 2:
            self._host_waiting = False
            return self._room_available
        return None

    @property
    def divisor(self) -> int:
        return self._divisor

    # ------------------------------------------------------- the compiled port path

    def attach_compiled_ports(self, compiled: CompiledPorts) -> None:
        """Let `compiled` answer the common-state accesses from now on (devices/uart_ports.py)."""
        with self._lock:
            self._compiled = compiled
            self._hand_over()

    def flush_compiled(self) -> None:
        """Send on the output the compiled port path gathered, before what the guest does next
        (vmm/tcg/io_dispatch.py). Under the lock even when the C buffer is empty: another thread
        (the backstop, host input) may have taken bytes back and not yet sent them on."""
        with self._lock:
            if not self._compiled.output_waiting:
                return
            transmitted, output = self._compiled.take_output()
            self.transmitted += transmitted
            self._output(output)

    def drive_line(self, level: bool) -> None:
        """The compiled path moved the interrupt line (its own lock held, which keeps this
        UART's locked sections out until the level is set)."""
        self._irq.set_level(level)

    def _take_back(self) -> None:
        """The registers back from the compiled path, and its output sent on (lock held)."""
        compiled = self._compiled
        if compiled is None:
            return
        taken = compiled.take()
        if taken is None:
            return
        self._ier, self._scr = taken.ier, taken.scr
        self._thr_interrupt = taken.thr_interrupt
        self._irq_level = taken.irq_level
        self._transmitting_since = taken.transmitting_since_ns
        self.transmitted += taken.transmitted
        if taken.output:
            self._output(taken.output)

    def _hand_over(self) -> None:
        """Give the registers to the compiled path if they are in a state it handles (lock held):
        both FIFOs empty, no line-status error or modem-status delta, DLAB and loopback off, no
        host input waiting for room."""
        compiled = self._compiled
        if (compiled is None or self._fifo or self._lsr & LSR_ERRORS or self._msr & MSR_DELTAS
                or self._lcr & LCR_DLAB or self._mcr & MCR_LOOP or self._host_waiting):
            return
        registers = compiled.registers
        registers.ier, registers.lcr, registers.mcr = self._ier, self._lcr, self._mcr
        registers.lsr, registers.msr, registers.scr = self._lsr, self._msr, self._scr
        registers.fifo_bits = IIR_FIFO_ENABLED if self._fifo_enabled else 0
        registers.thr_interrupt = self._thr_interrupt
        registers.transmitting = self._transmitting_since is not None
        registers.transmitting_since_ns = self._transmitting_since or 0
        registers.may_start_transmitting = self._backstop is not None
        registers.irq_level = self._irq_level
        compiled.grant()


# -- where it sits: COM1 ------------------------------------------------------------

COM1_PORT = 0x3F8
COM1_IRQ = 4


def plug(board: Board) -> Uart16550:
    """COM1 (ttyS0): the guest's serial console, and the host console's input."""
    uart = Uart16550(board.irq(COM1_IRQ), board.serial_write or board.console_write,
                     room_available=board.console_room_available)
    board.pio.register(COM1_PORT, 8, uart, "com1")
    board.acpi.append(aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(
            aml.io(COM1_PORT, COM1_PORT, 0x08, 8),
            aml.irq_no_flags(COM1_IRQ),
        )),
    ))
    board.console_input = uart.receive
    board.serial_in_use = lambda: uart.transmitted > 0
    return uart
