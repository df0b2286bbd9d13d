"""The boot-timer port records the first write only."""

from devices.boot_timer import BootTimer, boot_clock, process_start_time


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_first_write_records_time_since_start_and_calls_back() -> None:
    clock = FakeClock(101.5)
    marks = []
    timer = BootTimer(100.0, clock=clock, on_mark=marks.append)
    assert timer.elapsed is None
    timer.write(0, 1, 123)
    assert timer.elapsed == 1.5
    assert marks == [1.5]


def test_later_writes_do_not_move_the_mark() -> None:
    clock = FakeClock(10.0)
    marks = []
    timer = BootTimer(9.0, clock=clock, on_mark=marks.append)
    timer.write(0, 1, 1)
    clock.now = 20.0
    timer.write(0, 1, 1)
    assert timer.elapsed == 1.0
    assert marks == [1.0]
    assert timer.writes == 2


def test_process_start_is_in_the_past_on_the_same_clock() -> None:
    start = process_start_time()
    now = boot_clock()
    assert 0 <= now - start < 24 * 3600  # started before now, on the same scale
