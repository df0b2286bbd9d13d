from devices.acpi_pm import RESET, SLEEP_CONTROL, AcpiPowerManagement


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
