"""The 16550A model: registers, FIFOs, interrupts and the host receive path."""

from __future__ import annotations

import pytest

from devices.base import NullIrqLine
from devices.uart import (
    IER,
    IER_THRI,
    IIR,
    IIR_NO_INT,
    IIR_THRI,
    LCR,
    LCR_DLAB,
    LSR,
    LSR_DR,
    LSR_TEMT,
    LSR_THRE,
    MCR,
    MCR_OUT2,
    RBR,
    SCR,
    THR,
    Uart16550,
)


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


def test_thr_write_rearms_the_thre_interrupt(h: Harness) -> None:
    h.w(IER, IER_THRI)
    h.r(IIR)
    assert not h.irq.level
    h.w(THR, ord("a"))
    assert h.irq.level
    assert h.iir() == IIR_THRI


def test_disabling_thri_drops_the_interrupt(h: Harness) -> None:
    h.w(IER, IER_THRI)
    h.w(IER, 0)
    assert not h.irq.level
    assert h.r(IIR) == IIR_NO_INT
