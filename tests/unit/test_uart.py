"""The 16550A model: registers, FIFOs, interrupts and the host receive path."""

from __future__ import annotations

import threading
import time

import pytest

from devices.uart import (
    FCR,
    FCR_CLEAR_RX,
    FCR_CLEAR_TX,
    FCR_ENABLE_FIFO,
    IER,
    IER_MSI,
    IER_RDI,
    IER_RLSI,
    IER_THRI,
    IIR,
    IIR_FIFO_ENABLED,
    IIR_MSI,
    IIR_NO_INT,
    IIR_RDI,
    IIR_RLSI,
    IIR_RX_TIMEOUT,
    IIR_THRI,
    LCR,
    LCR_DLAB,
    LSR,
    LSR_DR,
    LSR_OE,
    LSR_TEMT,
    LSR_THRE,
    MCR,
    MCR_DTR,
    MCR_LOOP,
    MCR_OUT1,
    MCR_OUT2,
    MCR_RTS,
    MSR,
    MSR_CTS,
    MSR_DCD,
    MSR_DCTS,
    MSR_DDCD,
    MSR_DDSR,
    MSR_DSR,
    MSR_RI,
    MSR_TERI,
    RBR,
    SCR,
    THR,
    Uart16550,
)
from vmm.bus import NullIrqLine


class Harness:
    def __init__(self, **kwargs) -> None:
        self.irq = NullIrqLine()
        self.out = bytearray()
        self.uart = Uart16550(self.irq, self.out.extend, **kwargs)

    def r(self, offset: int) -> int:
        return self.uart.read(offset, 1)

    def w(self, offset: int, value: int) -> None:
        self.uart.write(offset, 1, value)

    def iir(self) -> int:
        return self.r(IIR) & 0x0F

    def read_all(self) -> bytes:
        data = bytearray()
        while self.r(LSR) & LSR_DR:
            data.append(self.r(RBR))
        return bytes(data)


@pytest.fixture
def h() -> Harness:
    return Harness()


# Transmit and line status.


def test_thr_writes_reach_the_output(h: Harness) -> None:
    for byte in b"hello\n":
        h.w(THR, byte)
    assert bytes(h.out) == b"hello\n"
    assert h.uart.transmitted == 6


def test_lsr_reports_transmitter_empty_at_reset_and_after_a_write(h: Harness) -> None:
    assert h.r(LSR) == LSR_THRE | LSR_TEMT
    h.w(THR, ord("x"))
    assert h.r(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_wide_access_is_a_run_of_byte_accesses(h: Harness) -> None:
    h.uart.write(THR, 2, 0x6261)  # as `out dx, ax` would: 'a' to THR, 0x62 to IER
    assert bytes(h.out) == b"a"
    assert h.r(IER) == 0x02
    assert h.uart.read(LCR, 2) == (h.r(MCR) << 8) | h.r(LCR)


def test_scratch_register_holds_a_byte(h: Harness) -> None:
    for value in (0xA5, 0x5A, 0x00):
        h.w(SCR, value)
        assert h.r(SCR) == value


def test_divisor_latch_is_behind_dlab(h: Harness) -> None:
    h.w(LCR, LCR_DLAB | 0x03)
    h.w(0, 0x01)
    h.w(1, 0x02)
    assert (h.r(0), h.r(1)) == (0x01, 0x02)
    assert h.uart.divisor == 0x0201
    h.w(LCR, 0x03)
    assert h.out == b""  # the divisor write did not transmit
    assert h.r(IER) == 0  # nor touch IER
    assert h.r(LCR) == 0x03


def test_ier_keeps_only_the_four_16550a_bits(h: Harness) -> None:
    h.w(IER, 0xFF)
    assert h.r(IER) == 0x0F


def test_mcr_keeps_only_its_five_bits(h: Harness) -> None:
    h.w(MCR, 0xFF)
    assert h.r(MCR) == 0x1F


def test_mcr_resets_with_out2_as_firmware_leaves_it(h: Harness) -> None:
    assert h.r(MCR) == MCR_OUT2


# Interrupt identification and the THRE interrupt.


def test_no_interrupt_pending_at_reset(h: Harness) -> None:
    assert h.r(IIR) == IIR_NO_INT
    assert not h.irq.level


def test_enabling_thri_with_empty_thr_raises_the_interrupt(h: Harness) -> None:
    h.w(IER, IER_THRI)
    assert h.irq.level
    assert h.r(IIR) == IIR_THRI
    # Reading IIR while it names THRE acknowledges it.
    assert h.r(IIR) == IIR_NO_INT
    assert not h.irq.level


def test_linux_thre_test_sequence_sees_the_interrupt_each_time(h: Harness) -> None:
    # serial8250_do_startup: IER=THRI, read IIR, IER=0, IER=THRI, read IIR.
    h.w(IER, IER_THRI)
    first = h.r(IIR)
    h.w(IER, 0)
    h.w(IER, IER_THRI)
    second = h.r(IIR)
    assert first & IIR_NO_INT == 0
    assert second & IIR_NO_INT == 0


def test_thr_write_rearms_the_thre_interrupt_once_the_guest_looks_again(h: Harness) -> None:
    h.w(IER, IER_THRI)
    h.r(IIR)
    assert not h.irq.level
    h.w(THR, ord("a"))
    assert h.iir() == IIR_THRI


def test_a_burst_the_driver_ends_by_disabling_thri_raises_no_interrupt(h: Harness) -> None:
    # Linux's 8250 driver in its THRE handler: read IIR (acknowledge), LSR, MSR, write
    # up to 16 bytes, then, with nothing left to send, clear IER.THRI.
    h.w(IER, IER_THRI)
    edges = h.irq.edges
    assert h.r(IIR) & 0x0F == IIR_THRI
    h.r(LSR)
    h.r(MSR)
    for byte in b"12345\r\n":
        h.w(THR, byte)
    h.w(IER, 0)
    assert h.r(IIR) == IIR_NO_INT
    assert h.irq.edges == edges
    assert not h.irq.level
    assert bytes(h.out) == b"12345\r\n"


def test_a_full_burst_interrupts_again_when_the_handler_looks(h: Harness) -> None:
    # 16 bytes written, more waiting: the handler's next IIR read finds THRE again.
    h.w(IER, IER_THRI)
    h.r(IIR)
    for byte in range(16):
        h.w(THR, byte)
    assert h.r(IIR) & 0x0F == IIR_THRI


def test_lsr_never_shows_the_transmitter_busy(h: Harness) -> None:
    h.w(THR, ord("a"))
    assert h.r(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_the_thre_interrupt_comes_to_a_guest_that_writes_and_waits() -> None:
    # A driver that writes THR and waits for the interrupt without touching the chip
    # again still gets it, from the backstop thread, which then ends.
    h = Harness()
    h.w(IER, IER_THRI)
    h.r(IIR)
    h.w(THR, ord("a"))
    deadline = time.monotonic() + 10
    while not h.irq.level and time.monotonic() < deadline:
        time.sleep(0.001)
    assert h.irq.level
    assert h.iir() == IIR_THRI
    while h.uart._backstop is not None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert h.uart._backstop is None


def test_disabling_thri_drops_the_interrupt(h: Harness) -> None:
    h.w(IER, IER_THRI)
    h.w(IER, 0)
    assert not h.irq.level
    assert h.r(IIR) == IIR_NO_INT


def test_the_backstop_ends_quietly_when_the_machine_closed_the_line(monkeypatch) -> None:
    class ClosedLine:  # KVM's line once the VM fd is closed
        def set_level(self, high: bool) -> None:
            raise OSError(9, "Bad file descriptor")

    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    uart = Uart16550(NullIrqLine(), lambda data: None)
    uart.write(IER, 1, IER_THRI)
    uart.read(IIR, 1)
    uart._irq = ClosedLine()
    uart.write(THR, 1, ord("a"))
    deadline = time.monotonic() + 10
    while uart._backstop is not None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert uart._backstop is None
    assert escaped == []


# Receive path: FIFO, trigger levels, character timeout.


def test_received_bytes_are_read_from_rbr_with_dr_set(h: Harness) -> None:
    assert h.uart.receive(b"ab") == 2
    assert h.r(LSR) & LSR_DR
    assert h.read_all() == b"ab"
    assert not h.r(LSR) & LSR_DR


def test_without_fifo_only_one_byte_is_visible_the_rest_waits(h: Harness) -> None:
    h.uart.receive(b"xyz")
    h.w(IER, IER_RDI)
    assert h.iir() == IIR_RDI  # 8250 mode: one byte is enough
    assert h.read_all() == b"xyz"  # later bytes move in as the guest reads
    assert h.r(IIR) == IIR_NO_INT


def test_fifo_enable_shows_in_iir_top_bits(h: Harness) -> None:
    h.w(FCR, FCR_ENABLE_FIFO)
    assert h.r(IIR) == IIR_FIFO_ENABLED | IIR_NO_INT
    h.w(FCR, 0)
    assert h.r(IIR) == IIR_NO_INT


@pytest.mark.parametrize("bits,level", [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)])
def test_rx_trigger_level(bits: int, level: int) -> None:
    h = Harness()
    h.w(FCR, FCR_ENABLE_FIFO | bits)
    h.w(IER, IER_RDI)
    h.uart.receive(b"x" * (level - 1))
    if level > 1:
        # Below the trigger level the guest gets a character timeout instead.
        assert h.iir() == IIR_RX_TIMEOUT
    h.uart.receive(b"x")
    assert h.iir() == IIR_RDI
    assert h.irq.level


def test_rx_interrupt_clears_when_the_fifo_is_drained(h: Harness) -> None:
    h.w(FCR, FCR_ENABLE_FIFO | 0xC0)
    h.w(IER, IER_RDI)
    h.uart.receive(bytes(range(20)))
    assert h.iir() == IIR_RDI
    assert h.read_all() == bytes(range(20))
    assert h.iir() == IIR_NO_INT
    assert not h.irq.level


def test_fcr_clear_rx_discards_the_fifo_only(h: Harness) -> None:
    h.w(FCR, FCR_ENABLE_FIFO)
    h.uart.receive(bytes(range(20)))  # 16 in the FIFO, 4 still on the wire
    h.w(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RX)
    assert h.read_all() == bytes(range(16, 20))


def test_switching_fifo_mode_empties_the_fifo(h: Harness) -> None:
    h.uart.receive(b"ab")  # 'a' in the holding register, 'b' on the wire
    h.w(FCR, FCR_ENABLE_FIFO)
    assert h.read_all() == b"b"


def test_disabling_the_fifo_keeps_host_bytes_flowing(h: Harness) -> None:
    h.w(FCR, FCR_ENABLE_FIFO)
    h.uart.receive(bytes(range(20)))  # 16 in the FIFO, 4 on the wire
    h.w(FCR, 0)  # the FIFO contents are lost; the wire's bytes are next
    assert h.read_all() == bytes(range(16, 20))


def test_receive_interrupt_needs_ier(h: Harness) -> None:
    h.uart.receive(b"a")
    assert h.r(IIR) == IIR_NO_INT
    assert not h.irq.level


# Priorities and line status.


def test_interrupt_priorities(h: Harness) -> None:
    h.w(FCR, FCR_ENABLE_FIFO)
    h.w(MCR, MCR_OUT2 | MCR_LOOP)
    h.w(IER, IER_RDI | IER_THRI | IER_RLSI | IER_MSI)
    h.w(MCR, MCR_OUT2 | MCR_LOOP | MCR_RTS)  # CTS delta: a modem status interrupt
    for _ in range(17):  # loopback: the 17th byte overruns the 16-byte FIFO
        h.w(THR, 0x55)
    assert h.iir() == IIR_RLSI
    assert h.r(LSR) & LSR_OE  # reading LSR clears the overrun
    assert h.iir() == IIR_RDI
    h.read_all()
    assert h.iir() == IIR_THRI  # the read of IIR acknowledges THRE
    assert h.iir() == IIR_MSI
    assert h.r(MSR) & MSR_DCTS  # reading MSR clears the deltas
    assert h.iir() == IIR_NO_INT


def test_overrun_sets_oe_once_and_is_counted(h: Harness) -> None:
    h.w(MCR, MCR_LOOP)
    h.w(THR, 1)
    h.w(THR, 2)  # 8250 mode: the holding register is full
    assert h.uart.overruns == 1
    assert h.r(LSR) & LSR_OE
    assert not h.r(LSR) & LSR_OE
    assert h.read_all() == b"\x01"


# Loopback and the modem status register.


def test_loopback_returns_transmitted_bytes_and_sends_nothing(h: Harness) -> None:
    h.w(FCR, FCR_ENABLE_FIFO)
    h.w(MCR, MCR_LOOP)
    for byte in b"loop":
        h.w(THR, byte)
    assert h.read_all() == b"loop"
    assert h.out == b""


def test_loopback_holds_host_input_until_it_ends(h: Harness) -> None:
    h.w(MCR, MCR_LOOP)
    h.uart.receive(b"host")
    assert not h.r(LSR) & LSR_DR
    h.w(MCR, 0)
    assert h.read_all() == b"host"


def test_msr_without_loopback_reports_a_connected_line(h: Harness) -> None:
    assert h.r(MSR) == MSR_CTS | MSR_DSR | MSR_DCD


def test_msr_in_loopback_mirrors_mcr_outputs(h: Harness) -> None:
    # Linux's autoconfig: MCR = LOOP | OUT2 | RTS must read back MSR = DCD | CTS.
    h.w(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
    assert h.r(MSR) & 0xF0 == MSR_DCD | MSR_CTS
    h.w(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    assert h.r(MSR) & 0xF0 == MSR_DSR | MSR_RI


def test_msr_delta_bits(h: Harness) -> None:
    h.w(MCR, MCR_LOOP)
    h.r(MSR)  # clear the deltas from entering loopback
    h.w(MCR, MCR_LOOP | MCR_RTS | MCR_DTR | MCR_OUT2 | MCR_OUT1)
    assert h.r(MSR) == MSR_CTS | MSR_DSR | MSR_DCD | MSR_RI | MSR_DCTS | MSR_DDSR | MSR_DDCD
    assert h.r(MSR) & 0x0F == 0
    h.w(MCR, MCR_LOOP | MCR_RTS | MCR_DTR | MCR_OUT2)  # RI falls: trailing edge
    assert h.r(MSR) & 0x0F == MSR_TERI
    h.w(MCR, MCR_LOOP | MCR_RTS | MCR_DTR | MCR_OUT2 | MCR_OUT1)  # RI rises: no delta
    assert h.r(MSR) & 0x0F == 0


# The interrupt line on a PC.


def test_out2_gates_the_interrupt_line(h: Harness) -> None:
    h.w(MCR, 0)
    h.w(IER, IER_THRI)
    assert not h.irq.level
    assert h.iir() == IIR_THRI  # pending inside the chip all the same
    h.w(IER, 0)
    h.w(MCR, MCR_OUT2)
    h.w(IER, IER_THRI)
    assert h.irq.level


def test_loopback_keeps_the_interrupt_off_the_bus(h: Harness) -> None:
    h.w(MCR, MCR_OUT2 | MCR_LOOP)
    h.w(IER, IER_THRI)
    assert not h.irq.level
    h.w(MCR, MCR_OUT2)
    assert h.irq.level


def test_line_is_raised_once_per_pending_period(h: Harness) -> None:
    h.w(IER, IER_THRI)
    for byte in b"abc":
        h.w(THR, byte)  # THRE stays pending: no new edges
    assert h.irq.edges == 1


# Host side: the bounded buffer and backpressure.


def test_receive_takes_only_what_fits() -> None:
    h = Harness(host_buffer_size=8)
    # 8 bytes of host buffer behind the 8250-mode holding register.
    assert h.uart.receive(b"0123456789") == 9
    assert not h.uart.can_receive()
    assert h.uart.receive(b"9") == 0
    assert h.uart.overruns == 0
    assert h.read_all() == b"012345678"
    assert h.uart.can_receive()


def test_fifo_mode_receives_sixteen_more_bytes() -> None:
    h = Harness(host_buffer_size=8)
    h.w(FCR, FCR_ENABLE_FIFO)
    assert h.uart.receive(bytes(30)) == 24


def test_receive_can_drop_the_excess_as_an_overrun() -> None:
    h = Harness(host_buffer_size=4)
    assert h.uart.receive(b"abcdefg", drop_excess=True) == 5  # holding register + 4
    assert h.uart.overruns == 2
    assert h.r(LSR) & LSR_OE


def test_room_available_is_called_once_the_buffer_half_empties() -> None:
    calls = []
    h = Harness(host_buffer_size=8, room_available=lambda: calls.append(1))
    h.uart.receive(b"0123456789")  # 1 in the holding register, 8 on the wire
    for _ in range(3):
        h.r(RBR)
    assert calls == []
    h.r(RBR)
    assert calls == [1]  # 4 left on the wire: half of 8
    h.read_all()
    assert calls == [1]  # once per refusal, not once per byte


def test_room_available_not_called_when_nothing_was_refused() -> None:
    calls = []
    h = Harness(host_buffer_size=8, room_available=lambda: calls.append(1))
    h.uart.receive(b"0123")
    h.read_all()
    assert calls == []


def test_concurrent_receive_and_guest_reads_lose_nothing() -> None:
    h = Harness(host_buffer_size=64)
    payload = bytes(i & 0xFF for i in range(5000))
    room = threading.Event()
    h.uart._room_available = room.set  # noqa: SLF001 - wire the callback after creation

    def feed() -> None:
        view = memoryview(payload)
        while view:
            room.clear()
            taken = h.uart.receive(bytes(view[:100]))
            view = view[taken:]
            if taken == 0:
                room.wait(timeout=5)

    feeder = threading.Thread(target=feed)
    feeder.start()
    got = bytearray()
    while len(got) < len(payload):
        if h.r(LSR) & LSR_DR:
            got.append(h.r(RBR))
    feeder.join()
    assert bytes(got) == payload
    assert h.uart.overruns == 0


# The probes Linux's 8250 driver runs, in order (autoconfig and startup).


def test_linux_autoconfig_identifies_a_16550a(h: Harness) -> None:
    # IER must hold exactly the low four bits.
    h.w(IER, 0)
    assert h.r(IER) & 0x0F == 0
    h.w(IER, 0x0F)
    assert h.r(IER) & 0x0F == 0x0F
    h.w(IER, 0)
    # Loopback test: MCR = LOOP | OUT2 | RTS must read MSR = DCD | CTS.
    save_mcr = h.r(MCR)
    h.w(MCR, MCR_LOOP | 0x0A)
    assert h.r(MSR) & 0xF0 == 0x90
    h.w(MCR, save_mcr)
    # FIFO detection: IIR bits 7:6 read 3 once FIFOs are enabled.
    h.w(LCR, 0xBF)
    h.w(FCR, 0)  # the EFR write of a 16650 lands on FCR here
    h.w(LCR, 0)
    h.w(FCR, FCR_ENABLE_FIFO)
    assert h.r(IIR) >> 6 == 3
    # No EFR: reads at offset 2 with LCR = 0x80 / 0xBF are IIR, not zero.
    for lcr in (0x80, 0xBF):
        h.w(LCR, lcr)
        assert h.r(IIR) != 0
    # Not a 16750: IIR bit 5 stays clear even with the 64-byte FIFO bit written.
    h.w(LCR, 0)
    h.w(FCR, FCR_ENABLE_FIFO | 0x20)
    assert h.r(IIR) >> 5 == 6
    # Not an XScale UART: IER bit 6 (UUE) does not stick.
    h.w(IER, 0x40)
    assert h.r(IER) & 0x40 == 0


def test_linux_startup_sees_an_uart_and_a_working_thre_interrupt(h: Harness) -> None:
    # serial8250_clear_fifos, then the reads that clear pending state.
    h.w(FCR, FCR_ENABLE_FIFO)
    h.w(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RX | FCR_CLEAR_TX)
    h.w(FCR, 0)
    for register in (LSR, RBR, IIR, MSR):
        h.r(register)
    assert h.r(LSR) != 0xFF
    h.w(LCR, 0x03)
    h.w(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
    # The TXEN test: enable THRI, read LSR and IIR, expect an interrupt.
    h.w(IER, IER_THRI)
    lsr = h.r(LSR)
    iir = h.r(IIR)
    h.w(IER, 0)
    assert lsr & LSR_TEMT
    assert not iir & IIR_NO_INT
