"""The pvpanic port: advertised events and the panic callback."""

from devices.pvpanic import CRASH_LOADED, PANICKED, PvPanic


def make():
    calls = []
    dev = PvPanic(lambda: calls.append("panic"), crash_loaded=lambda: calls.append("crash"))
    return dev, calls


def test_read_advertises_panicked_and_crash_loaded() -> None:
    dev, _ = make()
    assert dev.read(0, 1) == PANICKED | CRASH_LOADED == 0x03


def test_panicked_calls_panic() -> None:
    dev, calls = make()
    dev.write(0, 1, PANICKED)
    assert calls == ["panic"]
    assert dev.events == [PANICKED]


def test_crash_loaded_is_not_a_panic() -> None:
    dev, calls = make()
    dev.write(0, 1, CRASH_LOADED)
    assert calls == ["crash"]


def test_unsupported_bits_are_ignored() -> None:
    dev, calls = make()
    dev.write(0, 1, 0x04)  # Linux 6.x's SHUTDOWN, which we do not advertise
    dev.write(0, 1, 0)
    assert calls == []
    assert dev.events == []


def test_crash_loaded_without_callback_is_harmless() -> None:
    calls = []
    dev = PvPanic(lambda: calls.append("panic"))
    dev.write(0, 1, CRASH_LOADED)
    assert calls == []
