"""The software CPU's ticker: every armed alarm fires, however the arms and disarms interleave."""

import threading
import time

from vmm.tcg.ticker import Ticker


def _ticker():
    fired = threading.Event()
    return Ticker(fired.set), fired


def test_an_alarm_fires():
    ticker, fired = _ticker()
    try:
        ticker.arm(time.monotonic_ns() + 1_000_000)
        assert fired.wait(10)
    finally:
        ticker.close()


def test_a_disarmed_alarm_does_not_fire_but_a_later_one_does():
    ticker, fired = _ticker()
    try:
        far = time.monotonic_ns() + 200_000_000
        ticker.arm(far)  # the thread now sleeps until `far`
        ticker.disarm()
        ticker.arm(far + 100_000_000)  # later than what the thread sleeps toward: no wake-up needed
        assert fired.wait(10)
        fired.clear()
        ticker.arm(time.monotonic_ns() + 2 * 10**9)
        ticker.disarm()
        assert not fired.wait(2.5)
    finally:
        ticker.close()


def test_an_earlier_alarm_wakes_the_sleeping_ticker():
    ticker, fired = _ticker()
    try:
        ticker.arm(time.monotonic_ns() + 3600 * 10**9)  # an hour away
        time.sleep(0.05)  # the thread is asleep toward it
        ticker.disarm()
        ticker.arm(time.monotonic_ns() + 1_000_000)
        assert fired.wait(10)  # not an hour
    finally:
        ticker.close()
