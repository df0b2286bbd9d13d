"""The I/O APIC: registers, edge and level pins, remote IRR and EOI, delivery to a local APIC."""

from __future__ import annotations

import random

import pytest

from devices import lapic as L
from devices.ioapic import (
    ENTRY_LEVEL,
    ENTRY_LOGICAL,
    ENTRY_MASKED,
    ENTRY_REMOTE_IRR,
    REG_EOI,
    REG_SELECT,
    REG_WINDOW,
    IoApic,
)
from devices.lapic import ApicBus, ApicMessage, LocalApic, NullLapicHost


def read_reg(ioapic: IoApic, index: int) -> int:
    ioapic.write(REG_SELECT, 4, index)
    return ioapic.read(REG_WINDOW, 4)


def write_reg(ioapic: IoApic, index: int, value: int) -> None:
    ioapic.write(REG_SELECT, 4, index)
    ioapic.write(REG_WINDOW, 4, value)


def route(ioapic: IoApic, pin: int, low: int, destination: int = 0) -> None:
    write_reg(ioapic, 0x11 + 2 * pin, destination << 24)
    write_reg(ioapic, 0x10 + 2 * pin, low)


@pytest.fixture
def sent() -> list[ApicMessage]:
    return []


@pytest.fixture
def ioapic(sent) -> IoApic:
    return IoApic(sent.append)


def test_identification_registers(ioapic):
    assert read_reg(ioapic, 0x01) == 0x0017_0020  # 24 entries, version 0x20
    write_reg(ioapic, 0x00, 0x0A00_0000)
    assert read_reg(ioapic, 0x00) == 0x0A00_0000
    assert read_reg(ioapic, 0x02) == 0x0A00_0000
    write_reg(ioapic, 0x01, 0)  # read-only
    assert read_reg(ioapic, 0x01) == 0x0017_0020
    assert ioapic.read(REG_SELECT, 4) == 0x01


def test_entries_reset_masked_and_read_back(ioapic):
    for pin in range(24):
        assert read_reg(ioapic, 0x10 + 2 * pin) == ENTRY_MASKED
    route(ioapic, 5, ENTRY_LOGICAL | 0x31, destination=0x03)
    assert read_reg(ioapic, 0x10 + 10) == ENTRY_LOGICAL | 0x31
    assert read_reg(ioapic, 0x11 + 10) == 0x0300_0000
    assert read_reg(ioapic, 0x10 + 2 * 24) == 0  # past the last entry


def test_read_only_bits_cannot_be_written(ioapic):
    route(ioapic, 3, ENTRY_REMOTE_IRR | (1 << 12) | ENTRY_LEVEL | 0x40)
    assert read_reg(ioapic, 0x16) == ENTRY_LEVEL | 0x40


def test_edge_pin_sends_once_per_rising_edge(ioapic, sent):
    route(ioapic, 4, 0x34, destination=1)
    ioapic.set_level(4, True)
    ioapic.set_level(4, True)
    assert sent == [ApicMessage(vector=0x34, destination=1)]
    ioapic.set_level(4, False)
    ioapic.set_level(4, True)
    assert len(sent) == 2


def test_edge_on_masked_pin_is_lost(ioapic, sent):
    route(ioapic, 4, ENTRY_MASKED | 0x34)
    ioapic.set_level(4, True)
    ioapic.set_level(4, False)
    route(ioapic, 4, 0x34)
    assert sent == []


def test_level_pin_remote_irr_and_eoi(ioapic, sent):
    route(ioapic, 9, ENTRY_LEVEL | 0x49)
    ioapic.set_level(9, True)
    assert len(sent) == 1 and sent[0].level_triggered
    assert read_reg(ioapic, 0x10 + 18) & ENTRY_REMOTE_IRR
    ioapic.set_level(9, False)
    ioapic.set_level(9, True)
    assert len(sent) == 1  # remote IRR holds it until the EOI
    ioapic.eoi(0x49)
    assert len(sent) == 2  # still asserted: sent again
    ioapic.set_level(9, False)
    ioapic.eoi(0x49)
    assert len(sent) == 2
    assert not read_reg(ioapic, 0x10 + 18) & ENTRY_REMOTE_IRR


def test_eoi_for_another_vector_does_not_clear_remote_irr(ioapic, sent):
    route(ioapic, 9, ENTRY_LEVEL | 0x49)
    ioapic.set_level(9, True)
    ioapic.eoi(0x50)
    assert read_reg(ioapic, 0x10 + 18) & ENTRY_REMOTE_IRR


def test_eoi_register_at_0x40(ioapic, sent):
    route(ioapic, 9, ENTRY_LEVEL | 0x49)
    ioapic.set_level(9, True)
    ioapic.set_level(9, False)
    ioapic.write(REG_EOI, 4, 0x49)
    assert not read_reg(ioapic, 0x10 + 18) & ENTRY_REMOTE_IRR


def test_unmasking_an_asserted_level_pin_sends(ioapic, sent):
    route(ioapic, 10, ENTRY_MASKED | ENTRY_LEVEL | 0x4A)
    ioapic.set_level(10, True)
    assert sent == []
    route(ioapic, 10, ENTRY_LEVEL | 0x4A)
    assert len(sent) == 1


def test_switching_to_edge_clears_remote_irr(ioapic, sent):
    route(ioapic, 9, ENTRY_LEVEL | 0x49)
    ioapic.set_level(9, True)
    route(ioapic, 9, 0x49)
    assert not read_reg(ioapic, 0x10 + 18) & ENTRY_REMOTE_IRR


def test_unsupported_delivery_modes_are_dropped(ioapic, sent):
    route(ioapic, 1, (L.EXTINT << 8) | 0x21)
    route(ioapic, 2, (3 << 8) | 0x22)
    ioapic.set_level(1, True)
    ioapic.set_level(2, True)
    assert sent == []


def test_nmi_delivery_mode(ioapic, sent):
    route(ioapic, 1, L.NMI << 8)
    ioapic.set_level(1, True)
    assert sent[0].delivery_mode == L.NMI


def test_pin_out_of_range(ioapic):
    with pytest.raises(ValueError):
        ioapic.set_level(24, True)


def test_redirection_to_a_local_apic_and_back(ioapic):
    """A level-triggered pin through the APIC bus to CPU 1; its EOI clears remote IRR."""

    class Host(NullLapicHost):
        def eoi_broadcast(self, vector: int) -> None:
            ioapic.eoi(vector)

    host = Host()
    apics = [LocalApic(i, host, lambda: 0) for i in range(2)]
    for a in apics:
        a.write(L.REG_SVR, 4, 0x1FF)
    bus = ApicBus(apics)
    ioapic._deliver = bus.deliver
    route(ioapic, 11, ENTRY_LEVEL | 0x5B, destination=1)
    ioapic.set_level(11, True)
    assert apics[0].highest_deliverable() is None
    assert apics[1].acknowledge() == 0x5B
    assert apics[1].tmr & (1 << 0x5B)
    ioapic.set_level(11, False)
    apics[1].write(L.REG_EOI, 4, 0)
    assert not read_reg(ioapic, 0x10 + 22) & ENTRY_REMOTE_IRR
    ioapic.set_level(11, True)
    assert apics[1].acknowledge() == 0x5B


def test_garbage_leaves_a_working_ioapic(ioapic, sent):
    rng = random.Random(7)
    for _ in range(3000):
        ioapic.write(rng.choice((0, 0x10, 0x40, 0x20)), rng.choice((1, 4)), rng.getrandbits(32))
        assert 0 <= ioapic.read(rng.choice((0, 0x10, 0x40)), 4) <= 0xFFFF_FFFF
        ioapic.set_level(rng.randrange(24), rng.random() < 0.5)
        ioapic.eoi(rng.randrange(256))
    # Whatever the guest did, a driver that programs a pin afresh gets its interrupts.
    assert read_reg(ioapic, 0x01) == 0x0017_0020
    ioapic.set_level(9, False)
    sent.clear()
    route(ioapic, 9, 0x49, destination=2)  # edge, fixed, physical
    assert read_reg(ioapic, 0x10 + 18) == 0x49 and read_reg(ioapic, 0x11 + 18) == 0x0200_0000
    ioapic.set_level(9, True)
    assert sent == [ApicMessage(vector=0x49, destination=2)]
