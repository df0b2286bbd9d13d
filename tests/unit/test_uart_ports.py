"""The serial port's compiled port path (devices/uart_ports.c) against the UART in Python alone.

The compiled hooks are called here the way the engine calls them (Unicorn's IN/OUT hook
signatures), with a Python fallback that reaches the UART through its read/write as
vmm/tcg/io_dispatch.py does; the same accesses made on a UART in Python alone must give
the same values, interrupt line, output and registers. Skipped where the module was not
built (make install, or python -m devices.uart_ports_build).
"""

from __future__ import annotations

import ctypes
import random
import threading
import time

import pytest

from devices import uart as uart_module
from devices import uart_ports
from devices.uart import (
    IER,
    IER_THRI,
    IIR,
    IIR_THRI,
    LSR,
    THR,
    Uart16550,
)

BASE = 0x3F8

pytestmark = pytest.mark.skipif(not uart_ports.compiled_ports_built(),
                                reason="the serial port's compiled port path is not built "
                                       "(python -m devices.uart_ports_build, with gcc and python3-dev)")

PORT_IN = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p)
PORT_OUT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p)


class LevelLog:
    """An IrqLine that keeps every level it was driven to."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    @property
    def level(self) -> bool:
        return bool(self.levels) and self.levels[-1]

    def set_level(self, high: bool) -> None:
        self.levels.append(high)

    def pulse(self) -> None:
        raise AssertionError("the UART's line is a level")


class PythonUart:
    """The UART in Python alone, reached at its port numbers."""

    def __init__(self) -> None:
        self.irq = LevelLog()
        self.out = bytearray()
        self.uart = Uart16550(self.irq, self.out.extend)

    def port_in(self, port: int, size: int) -> int:
        if BASE <= port and port + size <= BASE + 8:
            return self.uart.read(port - BASE, size)
        return (1 << (8 * size)) - 1

    def port_out(self, port: int, size: int, value: int) -> None:
        if BASE <= port and port + size <= BASE + 8:
            self.uart.write(port - BASE, size, value)

    def state(self) -> dict:
        uart = self.uart
        return {"ier": uart._ier, "lcr": uart._lcr, "mcr": uart._mcr, "lsr": uart._lsr, "msr": uart._msr,
                "scr": uart._scr, "divisor": uart._divisor, "fifo_enabled": uart._fifo_enabled,
                "thr_interrupt": uart._thr_interrupt, "transmitting": uart._transmitting_since is not None,
                "irq": uart._irq_level, "fifo": list(uart._fifo), "wire": list(uart._wire),
                "transmitted": uart.transmitted, "overruns": uart.overruns, "output": bytes(self.out),
                "levels": self.irq.levels}


class CompiledUart(PythonUart):
    """The same UART behind the compiled hooks; what they pass on reaches it through Python."""

    def __init__(self) -> None:
        super().__init__()
        self.stop = ctypes.c_uint64(0)
        self.passed_on = 0  # accesses the compiled hooks left to Python
        self._python_in = PORT_IN(self._fallback_in)
        self._python_out = PORT_OUT(self._fallback_out)
        self._python_line = uart_ports.LINE_CFUNC(lambda uc, level: self.uart.drive_line(bool(level)))
        self.compiled = uart_ports.CompiledPorts(BASE, ctypes.addressof(self.stop),
                                                 *(ctypes.cast(callback, ctypes.c_void_p).value for callback in
                                                   (self._python_in, self._python_out, self._python_line)))
        self.uart.attach_compiled_ports(self.compiled)
        self._ports = uart_ports.ffi.cast("void *", self.compiled.user_data)

    def _fallback_in(self, uc, port, size, user_data):
        self.passed_on += 1
        return super().port_in(port, size)

    def _fallback_out(self, uc, port, size, value, user_data):
        self.passed_on += 1
        super().port_out(port, size, value)

    def port_in(self, port: int, size: int) -> int:
        return uart_ports.lib.uart_port_in(uart_ports.ffi.NULL, port, size, self._ports)

    def port_out(self, port: int, size: int, value: int) -> None:
        uart_ports.lib.uart_port_out(uart_ports.ffi.NULL, port, size, value, self._ports)

    def state(self) -> dict:
        with self.uart._lock:  # everything back in Python, to compare
            self.uart._take_back()
        return super().state()


@pytest.fixture(autouse=True)
def no_backstop_thread(monkeypatch):
    """The transmitter's backstop thread starts as usual but never looks, so that time plays no
    part here (the tests that need it put it back)."""
    monkeypatch.setattr(Uart16550, "_run_backstop", lambda self: None)


def random_accesses(seed: int, count: int):
    """Mostly what Linux's 8250 driver does while it prints, with the rest mixed in: host input,
    DLAB, loopback, FIFO control, wide accesses, other ports, stop requests."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.random()
        if kind < 0.35:
            yield ("out", BASE + THR, 1, rng.randrange(256))
        elif kind < 0.5:
            yield ("out", BASE + IER, 1, rng.choice([0x05, 0x07, 0x00, 0x02, 0x0F, rng.randrange(256)]))
        elif kind < 0.8:
            yield ("in", BASE + rng.choice([IIR, LSR, 6, IIR, LSR, 0, 0, 0, 1, 3, 4, 7]), 1)
        elif kind < 0.86:
            yield ("out", BASE + rng.choice([5, 6, 7]), 1, rng.randrange(256))
        elif kind < 0.89:
            yield ("out", BASE + 3, 1, rng.choice([0x03, 0x83, 0x03, 0x03]))  # LCR, sometimes DLAB
        elif kind < 0.91:
            yield ("out", BASE + 4, 1, rng.choice([0x0B, 0x1B, 0x03, 0x0B, 0x0B]))  # MCR: loopback, OUT2
        elif kind < 0.93:
            yield ("out", BASE + 2, 1, rng.choice([0xC7, 0x01, 0x00, 0x07]))  # FCR
        elif kind < 0.94:
            yield ("receive", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20))))
        elif kind < 0.97:
            yield ("stop", rng.random() < 0.2)
        elif kind < 0.985:
            yield ("in", BASE + rng.randrange(7), 2)
        else:
            yield ("in", rng.choice([BASE - 1, BASE + 8, 0, 0xFFFF, 0x2F8]), 1)


def run(uart: PythonUart, accesses) -> list:
    results = []
    for access in accesses:
        if access[0] == "in":
            results.append(uart.port_in(access[1], access[2]))
        elif access[0] == "out":
            uart.port_out(*access[1:])
        elif access[0] == "receive":
            results.append(uart.uart.receive(access[1], drop_excess=True))
        elif isinstance(uart, CompiledUart):  # a stop request: only the compiled hooks look at it
            uart.stop.value = access[1]
        results.append(uart.irq.level)
    return results


@pytest.mark.parametrize("seed", range(12))
def test_both_paths_give_the_same_values_line_output_and_registers(seed: int) -> None:
    accesses = list(random_accesses(seed, 3000))
    python, compiled = PythonUart(), CompiledUart()
    assert run(compiled, accesses) == run(python, accesses)
    assert compiled.state() == python.state()
    answered = sum(compiled.compiled.take_counts())
    assert answered > 50  # the compiled hooks did answer, in the states they handle
    assert answered + compiled.passed_on == sum(access[0] in ("in", "out") for access in accesses)


def linux_prints(uart: PythonUart, text: bytes) -> None:
    """The 8250 driver's accesses for one burst: start_tx, the interrupt, the writes, stop_tx."""
    uart.port_out(BASE + IER, 1, 0x07)
    assert uart.irq.level
    assert uart.port_in(BASE + IIR, 1) & 0x0F == IIR_THRI
    assert uart.port_in(BASE + LSR, 1) == 0x60
    uart.port_in(BASE + 6, 1)
    for byte in text:
        uart.port_out(BASE + THR, 1, byte)
    uart.port_out(BASE + IER, 1, 0x05)
    assert uart.port_in(BASE + IIR, 1) & 0x0F == 0x01


def test_a_printing_driver_is_answered_in_c() -> None:
    uart = CompiledUart()
    uart.port_out(BASE + IER, 1, 0x05)
    uart.uart._backstop = object()  # (the backstop thread lives while a guest prints)
    uart.uart.attach_compiled_ports(uart.compiled)  # handed over again, knowing it
    uart.passed_on = 0
    lines = [b"%d\r\n" % n for n in range(1, 2001)]
    for line in lines:
        linux_prints(uart, line)
    assert uart.state()["output"] == b"".join(lines)
    assert uart.uart.transmitted == len(b"".join(lines))
    # Enabling THRI (the line rises) and the IIR read that acknowledges it (the line falls)
    # only drive the line through Python; a THR write reaches Python when the C buffer is full.
    assert uart.passed_on == len(b"".join(lines)) // uart_ports.lib.UART_OUTPUT_SIZE
    assert uart.irq.levels == [True, False] * len(lines)


def test_output_past_the_buffer_arrives_whole_and_in_order() -> None:
    uart = CompiledUart()
    data = bytes(random.Random(1).randrange(256) for _ in range(3 * uart_ports.lib.UART_OUTPUT_SIZE + 100))
    for byte in data:
        uart.port_out(BASE + THR, 1, byte)
    assert uart.state()["output"] == data
    assert uart.uart.transmitted == len(data)


def test_with_a_stop_requested_every_access_goes_to_python() -> None:
    uart = CompiledUart()
    uart.port_in(BASE + LSR, 1)
    uart.stop.value = 1
    uart.passed_on = 0
    for _ in range(10):
        uart.port_in(BASE + LSR, 1)
        uart.port_out(BASE + 7, 1, 0x55)
    assert uart.passed_on == 20
    assert uart.compiled.take_counts() == (1, 0)


def test_the_environment_or_a_stale_module_chooses_python(monkeypatch) -> None:
    assert uart_ports.use_compiled_ports()
    monkeypatch.setenv(uart_ports.PORTS_ENV, "python")
    assert not uart_ports.use_compiled_ports()
    monkeypatch.delenv(uart_ports.PORTS_ENV)
    monkeypatch.setattr(uart_ports, "source_digest", lambda: uart_ports.lib.UART_PORTS_DIGEST + 1)
    assert not uart_ports.use_compiled_ports()


class HeldSleep:
    """devices/uart.py's clock, whose sleeps (the backstop thread's) wait for `release`."""

    monotonic_ns = staticmethod(time.monotonic_ns)

    def __init__(self) -> None:
        self.release = threading.Event()

    def sleep(self, seconds: float) -> None:
        self.release.wait(10)  # bounds a hang only
        time.sleep(seconds)


def test_the_backstop_reports_thre_and_sends_what_c_gathered(monkeypatch) -> None:
    # A driver that writes THR and waits for the interrupt without touching the chip again
    # gets it from the backstop thread, which also sends on the bytes the C hook kept.
    monkeypatch.undo()
    # The thread's first look comes a period after "a": "b" must come before it, or the look's
    # take would hand "b" to Python (rightly: a take hands the accesses to Python until the next
    # grant). The thread's sleeps wait until "b" is written, however late this thread gets to it.
    clock = HeldSleep()
    monkeypatch.setattr(uart_module, "time", clock)
    uart = CompiledUart()
    uart.port_out(BASE + IER, 1, IER_THRI)
    uart.port_in(BASE + IIR, 1)
    uart.port_out(BASE + THR, 1, ord("a"))  # starts the backstop thread (in Python)
    uart.port_out(BASE + THR, 1, ord("b"))  # kept by the C hook
    assert uart.passed_on == 1
    clock.release.set()
    deadline = time.monotonic() + 10
    while not uart.irq.level and time.monotonic() < deadline:
        time.sleep(0.001)
    assert uart.irq.level
    assert bytes(uart.out) == b"ab"
    assert uart.port_in(BASE + IIR, 1) & 0x0F == IIR_THRI
    while uart.uart._backstop is not None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert uart.uart._backstop is None
