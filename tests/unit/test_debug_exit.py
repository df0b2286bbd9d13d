"""The debug-exit port turns a guest's byte into the VM's exit status."""

from devices.debug_exit import DebugExit


def test_written_byte_becomes_the_stop_status() -> None:
    calls = []
    port = DebugExit(stop=lambda status: calls.append(status))
    port.write(0, 1, 42)
    port.write(0, 2, 0x1234)  # only the low byte counts
    assert calls == [42, 0x34]


def test_reads_look_like_an_empty_port() -> None:
    port = DebugExit(stop=lambda status: None)
    assert port.read(0, 1) == 0xFF
    assert port.read(0, 2) == 0xFFFF
