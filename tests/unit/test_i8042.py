"""The i8042 controller: the probe Linux runs, the reset line, the empty PS/2 ports."""

from __future__ import annotations

import pytest

from devices.i8042 import (
    CTR_AUXDIS,
    CTR_AUXINT,
    CTR_KBDDIS,
    CTR_KBDINT,
    I8042,
    INITIAL_CTR,
    STATUS_AUXDATA,
    STATUS_CMD,
    STATUS_OBF,
    STATUS_SYS,
    STATUS_TIMEOUT,
    STATUS_UNLOCKED,
)
from vmm.bus import NullIrqLine

DATA, COMMAND = 0, 4


class Harness:
    def __init__(self) -> None:
        self.resets = 0
        self.kbd_irq = NullIrqLine()
        self.aux_irq = NullIrqLine()
        self.dev = I8042(self._reset, kbd_irq=self.kbd_irq, aux_irq=self.aux_irq)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.dev.read(COMMAND, 1)

    def command(self, cmd: int, *params: int) -> None:
        self.dev.write(COMMAND, 1, cmd)
        for param in params:
            self.dev.write(DATA, 1, param)

    def reply(self) -> int:
        assert self.status() & STATUS_OBF, "no reply waiting"
        return self.dev.read(DATA, 1)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_idle_status_has_no_data_and_is_not_all_ones(h: Harness) -> None:
    status = h.status()
    assert status != 0xFF
    assert not status & STATUS_OBF
    assert status & STATUS_SYS
    assert status & STATUS_UNLOCKED


def test_self_test_answers_0x55(h: Harness) -> None:
    h.command(0xAA)
    assert h.reply() == 0x55
    assert not h.status() & STATUS_OBF


@pytest.mark.parametrize("cmd", [0xAB, 0xA9])
def test_interface_tests_pass(h: Harness, cmd: int) -> None:
    h.command(cmd)
    assert h.reply() == 0x00


def test_command_byte_read_and_write(h: Harness) -> None:
    h.command(0x20)
    assert h.reply() == INITIAL_CTR
    h.command(0x60, 0x56)
    h.command(0x20)
    assert h.reply() == 0x56
    assert h.dev.command_byte == 0x56


def test_internal_ram_beyond_the_command_byte(h: Harness) -> None:
    h.command(0x65, 0x99)
    h.command(0x25)
    assert h.reply() == 0x99


def test_status_remembers_whether_the_last_write_was_a_command(h: Harness) -> None:
    h.command(0x60)
    assert h.status() & STATUS_CMD
    h.dev.write(DATA, 1, INITIAL_CTR)
    assert not h.status() & STATUS_CMD


@pytest.mark.parametrize(
    "cmd,bit,set_",
    [
        (0xA7, CTR_AUXDIS, True),
        (0xA8, CTR_AUXDIS, False),
        (0xAD, CTR_KBDDIS, True),
        (0xAE, CTR_KBDDIS, False),
    ],
)
def test_port_enable_and_disable_show_in_the_command_byte(
    h: Harness, cmd: int, bit: int, set_: bool
) -> None:
    h.command(0x60, 0x00 if set_ else bit)
    h.command(cmd)
    h.command(0x20)
    assert bool(h.reply() & bit) == set_


def test_aux_loopback_returns_the_byte_as_aux_data(h: Harness) -> None:
    # Linux's i8042_check_aux: the internal loop must echo 0x5a with AUXDATA set.
    h.command(0xD3, 0x5A)
    assert h.status() & STATUS_AUXDATA
    assert h.reply() == 0x5A


def test_write_kbd_buffer_returns_the_byte_as_keyboard_data(h: Harness) -> None:
    h.command(0xD2, 0x1C)
    assert not h.status() & STATUS_AUXDATA
    assert h.reply() == 0x1C


def test_bytes_for_the_missing_keyboard_time_out_at_once(h: Harness) -> None:
    h.dev.write(DATA, 1, 0xF2)  # atkbd's GET ID
    status = h.status()
    assert status & STATUS_TIMEOUT
    assert not status & STATUS_AUXDATA
    assert h.reply() == 0xFE
    assert not h.status() & STATUS_TIMEOUT


def test_bytes_for_the_missing_mouse_time_out_at_once(h: Harness) -> None:
    h.command(0xD4, 0xF2)
    assert h.status() & (STATUS_TIMEOUT | STATUS_AUXDATA) == STATUS_TIMEOUT | STATUS_AUXDATA
    assert h.reply() == 0xFE


def test_flush_empties_the_output_buffer_in_a_few_reads(h: Harness) -> None:
    # Linux's i8042_flush declares "no controller" after 16 bytes.
    for _ in range(40):
        h.command(0x20)
    reads = 0
    while h.status() & STATUS_OBF:
        h.dev.read(DATA, 1)
        reads += 1
    assert 0 < reads < 16


def test_pulse_reset_line_calls_reset(h: Harness) -> None:
    h.command(0xFE)
    assert h.resets == 1


def test_pulsing_other_lines_does_not_reset(h: Harness) -> None:
    h.command(0xFF)  # pulse nothing
    h.command(0xFD)
    assert h.resets == 0


def test_output_port_write_with_reset_bit_low_resets(h: Harness) -> None:
    h.command(0xD1, 0x03)  # A20 on, reset line high: no reset
    assert h.resets == 0
    h.command(0xD0)
    assert h.reply() == 0x03
    h.command(0xD1, 0x02)
    assert h.resets == 1


def test_keyboard_irq_follows_output_buffer_when_enabled(h: Harness) -> None:
    h.command(0x60, CTR_KBDINT)
    h.command(0xD2, 0x1C)
    assert h.kbd_irq.level
    assert not h.aux_irq.level
    h.reply()
    assert not h.kbd_irq.level


def test_aux_irq_needs_auxint(h: Harness) -> None:
    h.command(0x60, 0)
    h.command(0xD3, 0xA5)
    assert not h.aux_irq.level
    h.reply()
    h.command(0x60, CTR_AUXINT)
    h.command(0xD3, 0xA5)
    assert h.aux_irq.level
    assert not h.kbd_irq.level


def test_two_port_views_and_one_range_agree() -> None:
    h = Harness()
    h.dev.command_port.write(0, 1, 0xAA)
    assert h.dev.command_port.read(0, 1) & STATUS_OBF
    assert h.dev.data_port.read(0, 1) == 0x55
    assert h.dev.read(1, 1) == 0xFF  # port B is not the controller's
