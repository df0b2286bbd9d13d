"""The 8259A pair: initialisation, masking, priority, EOI, cascade, spurious IRQs, ELCR."""

from __future__ import annotations

import pytest

from devices.pic import PicPair

MASTER_BASE = 0x30
SLAVE_BASE = 0x38


def linux_init(pair: PicPair, auto_eoi: bool = False) -> None:
    """The sequence Linux's init_8259A writes: ICW1-ICW4 to both chips, all masked."""
    icw4 = 0x03 if auto_eoi else 0x01
    for chip, base, icw3 in ((pair.master, MASTER_BASE, 0x04), (pair.slave, SLAVE_BASE, 0x02)):
        chip.write(0, 1, 0x11)  # ICW1: edge, cascade, ICW4 follows
        chip.write(1, 1, base)  # ICW2: vector base
        chip.write(1, 1, icw3)
        chip.write(1, 1, icw4)
        chip.write(1, 1, 0xFF)  # OCW1: everything masked


def unmask(pair: PicPair, irq: int) -> None:
    chip = pair.master if irq < 8 else pair.slave
    chip.write(1, 1, chip.read(1, 1) & ~(1 << (irq & 7)))
    if irq >= 8:
        unmask(pair, 2)


def eoi(pair: PicPair, irq: int) -> None:
    if irq >= 8:
        pair.slave.write(0, 1, 0x20)
    pair.master.write(0, 1, 0x20)


def read_isr(chip) -> int:
    chip.write(0, 1, 0x0B)
    value = chip.read(0, 1)
    chip.write(0, 1, 0x0A)
    return value


@pytest.fixture
def pair() -> PicPair:
    p = PicPair()
    linux_init(p)
    return p


def test_init_sets_vector_base_and_mask_reads_back(pair):
    assert pair.master.read(1, 1) == 0xFF
    pair.master.write(1, 1, 0x5A)
    assert pair.master.read(1, 1) == 0x5A
    assert pair.master.vector_base == MASTER_BASE
    assert pair.slave.vector_base == SLAVE_BASE


def test_masked_irq_is_not_signalled_until_unmasked(pair):
    pair.set_irq(4, True)
    assert not pair.has_interrupt()
    unmask(pair, 4)
    assert pair.has_interrupt()
    assert pair.acknowledge() == MASTER_BASE + 4


def test_edge_request_is_latched_after_the_line_drops(pair):
    unmask(pair, 3)
    pair.set_irq(3, True)
    pair.set_irq(3, False)
    assert pair.has_interrupt()
    assert pair.acknowledge() == MASTER_BASE + 3
    assert not pair.has_interrupt()


def test_edge_needs_a_new_rising_edge(pair):
    unmask(pair, 3)
    pair.set_irq(3, True)
    assert pair.acknowledge() == MASTER_BASE + 3
    eoi(pair, 3)
    pair.set_irq(3, True)  # still high: no new edge
    assert not pair.has_interrupt()
    pair.set_irq(3, False)
    pair.set_irq(3, True)
    assert pair.has_interrupt()


def test_fixed_priority_lower_irq_first(pair):
    unmask(pair, 1)
    unmask(pair, 5)
    pair.set_irq(5, True)
    pair.set_irq(1, True)
    assert pair.acknowledge() == MASTER_BASE + 1
    assert not pair.has_interrupt()  # IRQ5 ranks below IRQ1 in service: it waits for the EOI
    eoi(pair, 1)
    assert pair.acknowledge() == MASTER_BASE + 5


def test_higher_priority_nests_over_in_service(pair):
    unmask(pair, 1)
    unmask(pair, 5)
    pair.set_irq(5, True)
    assert pair.acknowledge() == MASTER_BASE + 5
    pair.set_irq(1, True)
    assert pair.has_interrupt()
    assert pair.acknowledge() == MASTER_BASE + 1
    assert read_isr(pair.master) == (1 << 1) | (1 << 5)
    eoi(pair, 1)  # non-specific EOI clears the highest-priority in-service bit
    assert read_isr(pair.master) == 1 << 5


def test_specific_eoi_clears_the_named_level(pair):
    unmask(pair, 6)
    pair.set_irq(6, True)
    pair.acknowledge()
    pair.master.write(0, 1, 0x60 | 6)
    assert read_isr(pair.master) == 0


def test_rotate_on_non_specific_eoi_makes_serviced_irq_lowest(pair):
    for irq in (1, 3):
        unmask(pair, irq)
    pair.set_irq(1, True)
    assert pair.acknowledge() == MASTER_BASE + 1
    pair.master.write(0, 1, 0xA0)  # rotate on non-specific EOI: IRQ1 becomes lowest
    pair.set_irq(1, False)
    pair.set_irq(1, True)
    pair.set_irq(3, True)
    assert pair.acknowledge() == MASTER_BASE + 3


def test_set_priority_command(pair):
    for irq in (0, 4):
        unmask(pair, irq)
    pair.master.write(0, 1, 0xC0 | 3)  # IRQ3 lowest, so IRQ4 highest
    pair.set_irq(0, True)
    pair.set_irq(4, True)
    assert pair.acknowledge() == MASTER_BASE + 4


def test_reading_irr_and_isr(pair):
    pair.set_irq(7, True)  # masked, but IRR records it
    assert pair.master.read(0, 1) == 1 << 7
    unmask(pair, 7)
    pair.acknowledge()
    assert pair.master.read(0, 1) == 0
    assert read_isr(pair.master) == 1 << 7


def test_spurious_irq7_when_request_vanished(pair):
    pair.master.elcr = 1 << 5
    unmask(pair, 5)
    pair.set_irq(5, True)
    assert pair.has_interrupt()
    pair.set_irq(5, False)  # a level request withdrawn before INTA
    assert pair.acknowledge() == MASTER_BASE + 7
    assert read_isr(pair.master) == 0  # a spurious IRQ7 is not put in service


def test_cascade_through_irq2(pair):
    unmask(pair, 12)
    pair.set_irq(12, True)
    assert pair.has_interrupt()
    assert pair.acknowledge() == SLAVE_BASE + 4
    assert read_isr(pair.master) == 1 << 2
    assert read_isr(pair.slave) == 1 << 4
    eoi(pair, 12)
    assert read_isr(pair.master) == 0 and read_isr(pair.slave) == 0


def test_slave_masked_does_not_reach_master(pair):
    unmask(pair, 2)
    pair.set_irq(9, True)
    assert not pair.has_interrupt()


def test_slave_interrupt_blocked_by_higher_master_in_service(pair):
    unmask(pair, 1)
    unmask(pair, 10)
    pair.set_irq(1, True)
    assert pair.acknowledge() == MASTER_BASE + 1
    pair.set_irq(10, True)
    assert not pair.has_interrupt()  # IRQ2 ranks below IRQ1 in service
    eoi(pair, 1)
    assert pair.acknowledge() == SLAVE_BASE + 2


def test_spurious_irq15_when_slave_has_nothing_at_its_inta(pair):
    # The master's IR2 mirrors the slave's INT, so through the pair API the two
    # INTA cycles are atomic; force the hardware race (the slave request going
    # away between the master's and the slave's INTA) by setting IR2 directly.
    unmask(pair, 2)
    pair.master.set_cascade(True)
    assert pair.acknowledge() == SLAVE_BASE + 7
    assert read_isr(pair.slave) == 0


def test_level_triggered_irq_reasserts_after_eoi_while_line_high(pair):
    pair.slave.elcr = 1 << 3  # IRQ11 level-triggered
    unmask(pair, 11)
    pair.set_irq(11, True)
    assert pair.acknowledge() == SLAVE_BASE + 3
    eoi(pair, 11)
    assert pair.has_interrupt()  # still asserted
    pair.set_irq(11, False)
    assert not pair.has_interrupt()


def test_auto_eoi_does_not_set_isr():
    p = PicPair()
    linux_init(p, auto_eoi=True)
    unmask(p, 4)
    p.set_irq(4, True)
    assert p.acknowledge() == MASTER_BASE + 4
    assert read_isr(p.master) == 0


def test_rotate_in_auto_eoi_mode():
    p = PicPair()
    linux_init(p, auto_eoi=True)
    for irq in (1, 3):
        unmask(p, irq)
    p.master.write(0, 1, 0x80)  # OCW2: set rotate in automatic EOI mode
    p.set_irq(1, True)
    assert p.acknowledge() == MASTER_BASE + 1  # IRQ1 becomes the lowest priority
    p.set_irq(1, False)
    p.set_irq(1, True)
    p.set_irq(3, True)
    assert p.acknowledge() == MASTER_BASE + 3
    p.master.write(0, 1, 0x00)  # clear rotate in automatic EOI mode
    assert not p.master.rotate_on_auto_eoi


def test_special_mask_mode_lets_lower_priority_through(pair):
    unmask(pair, 1)
    unmask(pair, 6)
    pair.set_irq(1, True)
    pair.acknowledge()  # IRQ1 in service
    pair.master.write(1, 1, pair.master.read(1, 1) | 0x02)  # mask IRQ1
    pair.master.write(0, 1, 0x68)  # OCW3: set special mask mode
    pair.set_irq(6, True)
    assert pair.acknowledge() == MASTER_BASE + 6


def test_poll_command(pair):
    unmask(pair, 3)
    pair.set_irq(3, True)
    pair.master.write(0, 1, 0x0C)  # OCW3 poll
    assert pair.master.read(0, 1) == 0x83
    assert read_isr(pair.master) == 1 << 3
    pair.master.write(0, 1, 0x0C)
    assert pair.master.read(0, 1) == 0


def test_icw1_resets_state(pair):
    unmask(pair, 3)
    pair.set_irq(3, True)
    pair.acknowledge()
    pair.master.write(0, 1, 0x11)
    assert pair.master.read(0, 1) == 0  # IRR cleared, IRR selected for reading
    assert read_isr(pair.master) == 0


def test_elcr_masks_unsettable_bits(pair):
    pair.elcr.write(0, 1, 0xFF)
    pair.elcr.write(1, 1, 0xFF)
    assert pair.elcr.read(0, 1) == 0xF8  # IRQ0-2 always edge
    assert pair.elcr.read(1, 1) == 0xDE  # IRQ8 and IRQ13 always edge
    assert pair.elcr.read(0, 2) == 0xDEF8


def test_notify_called_when_int_rises():
    calls = []
    p = PicPair(notify=lambda: calls.append(1))
    linux_init(p)
    p.set_irq(4, True)
    assert calls == []  # masked
    unmask(p, 4)
    assert len(calls) == 1


def test_powers_up_masked_and_icw1_unmasks():
    p = PicPair()
    assert p.master.read(1, 1) == 0xFF and p.slave.read(1, 1) == 0xFF
    p.set_irq(4, True)
    assert not p.has_interrupt()
    p.master.write(0, 1, 0x11)  # ICW1 clears the mask, as the datasheet says
    assert p.master.read(1, 1) == 0


def test_cascade_irq_cannot_be_driven(pair):
    with pytest.raises(ValueError):
        pair.set_irq(2, True)


def test_garbage_writes_do_not_crash():
    p = PicPair()
    for value in range(256):
        for chip in (p.master, p.slave):
            chip.write(0, 1, value)
            chip.write(1, 1, value ^ 0x5A)
            chip.read(0, 1)
            chip.read(1, 1)
        p.elcr.write(0, 2, value * 257)
        p.set_irq((3, 4, 8, 11, 14)[value % 5], bool(value & 1))
        p.has_interrupt()
        vector = p.acknowledge()
        assert 0 <= vector < 256
