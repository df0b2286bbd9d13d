from devices.acpi_pm import PM_TIMER_HZ, RESET, SLEEP_CONTROL, AcpiPmTimer, AcpiPowerManagement


def make():
    events = []
    return AcpiPowerManagement(lambda: events.append("off"), lambda: events.append("reset")), events


def test_s5_with_slp_en_powers_off():
    device, events = make()
    device.write(SLEEP_CONTROL, 1, (5 << 2) | (1 << 5))
    assert events == ["off"]


def test_slp_typ_without_slp_en_does_nothing():
    device, events = make()
    device.write(SLEEP_CONTROL, 1, 5 << 2)
    assert events == []


def test_other_sleep_states_are_ignored():
    device, events = make()
    device.write(SLEEP_CONTROL, 1, (1 << 2) | (1 << 5))
    assert events == []


def test_reset_value_resets_and_others_do_not():
    device, events = make()
    device.write(RESET, 1, 0x41)
    device.write(RESET, 1, 0x42)
    assert events == ["reset"]


def test_pm_timer_counts_at_3_579545_mhz_in_24_bits():
    now = [0]
    timer = AcpiPmTimer(clock=lambda: now[0])
    assert timer.read(0, 4) == 0
    now[0] = 1_000_000_000  # one second: 3,579,545 ticks
    assert timer.read(0, 4) == PM_TIMER_HZ
    now[0] = 10_000_000_000  # 35,795,450 ticks wrap at 2^24; bits 24-31 read 0
    assert timer.read(0, 4) == 35_795_450 % (1 << 24)
    assert timer.read(0, 4) >> 24 == 0


def test_pm_timer_reads_by_byte_and_word_and_ignores_writes():
    timer = AcpiPmTimer(clock=lambda: 1_000_000_000)  # 0x369e99
    timer.write(0, 4, 0)
    assert [timer.read(offset, 1) for offset in range(4)] == [0x99, 0x9E, 0x36, 0]
    assert timer.read(0, 2) == 0x9E99 and timer.read(2, 2) == 0x36
