"""The serial port's compiled port path on the software CPU, and whether it is used.

A guest that prints on the serial port makes about 19 port accesses a line
(Linux's 8250 driver: two bursts of THR writes, each between enabling and
disabling the THRE interrupt, reading IIR, LSR and MSR). On the software CPU
each went from Unicorn's IN/OUT hook through ctypes into Python, the bus and
devices/uart.py, about 1.8 us of CPU an access more than the engine's own
share (docs/benchmarks.md, "Console output"). So,
where `make install` or `pip install` could compile uart_ports.c (it needs a
C compiler and Python's headers), the engine's IN and OUT hooks are that
file's functions (vmm/tcg/io_dispatch.py installs them), and Python's
`Uart16550` hands its registers over whenever it leaves them in the common
state: both FIFOs empty, no line-status error or modem-status delta, DLAB
and loopback off. Then the C hook answers what it can exactly as the Python
model would, without the GIL: THR writes (gathered, up to
UART_OUTPUT_SIZE bytes), reads of every register, IER and SCR writes. When
one of them moves the interrupt line (the driver enabling THRI, the IIR
read that acknowledges it), the hook hands the new level to
`Uart16550.drive_line` through a Python callback, with its state locked so
that levels reach the line in order. An access to FCR, LCR or MCR, a wider
one, another port, and every access after the engine was asked to stop (a
kick drops them, io_dispatch.py) go to the Python hook as before: none of
the 19 while Linux prints.

Python takes the registers back (and sends the gathered output on, in
order) at the start of everything it does with the UART under its lock: a
guest access that came to Python, host input arriving, the transmitter's
backstop thread (which runs while a transmission is outstanding, so output
never waits longer than its 16 ms), and at the end of each slice of the
software CPU (vmm/tcg/io_dispatch.py), which also moves the accesses counted
here into the per-vCPU and per-device counts of --stats. The gathered output
alone (the registers stay handed over) is also sent on before every other
access that reaches Python is dispatched: what the guest does after
printing, another device's output, a reset or a stop, never reaches the
host before what it printed (io_dispatch.py). The C hook starts a
transmission only while that backstop thread lives, so that its rule (a
transmitter left busy reports itself empty after 16 ms) holds too.

KVM never uses it: its exits reach the UART through Python. PYVMM_UART_PORTS=python
chooses the Python hooks even where the module was built (the tests run
both, and a differential test holds them to the same register values,
output and interrupt line).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from devices.uart_ports_build import source_digest
from vmm.compiled_module import built_from_sources

PORTS_ENV = "PYVMM_UART_PORTS"  # "python": every serial port access goes to Python

# The C signature of the callback that drives the interrupt line: (uc, level).
LINE_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)

try:
    from devices._uart_ports import ffi, lib
except ImportError:  # not built: no compiler at install time, or never installed
    ffi = lib = None


def compiled_ports_built() -> bool:
    """True when the module was built from the uart_ports.c beside this file."""
    return built_from_sources(lib, "UART_PORTS_DIGEST", source_digest())


def use_compiled_ports() -> bool:
    return os.environ.get(PORTS_ENV) != "python" and compiled_ports_built()


@dataclass
class TakenBack:
    """What the compiled path changed since the registers were handed over."""

    ier: int
    scr: int
    thr_interrupt: bool
    irq_level: bool
    transmitting_since_ns: int | None
    transmitted: int
    output: bytes


class CompiledPorts:
    """One UART's compiled port path: the engine's IN/OUT hooks (`port_in_address`,
    `port_out_address`, called with `user_data`), which pass what they do not answer to
    `python_in`/`python_out` (C function pointers with Unicorn's hook signatures) and the
    interrupt line's new levels to `python_line` (a LINE_CFUNC)."""

    def __init__(self, base: int, stop_word: int, python_in: int, python_out: int, python_line: int) -> None:
        ports = lib.uart_ports_new(base, ffi.cast("uint64_t *", stop_word), ffi.cast("void *", python_in),
                                   ffi.cast("void *", python_out), ffi.cast("void *", python_line))
        if ports == ffi.NULL:
            raise MemoryError("the serial port's compiled port path")
        self._ports = ffi.gc(ports, lib.uart_ports_free)
        self.registers = ffi.new("struct uart_registers *")  # filled by the UART before grant()
        self._taken = ffi.new("struct uart_registers *")
        self._transmitted = ffi.new("uint32_t *")
        self._output = ffi.new("uint8_t[]", lib.UART_OUTPUT_SIZE)
        self.user_data = int(ffi.cast("uintptr_t", self._ports))
        self.port_in_address = _address("uart_port_in")
        self.port_out_address = _address("uart_port_out")

    def take(self) -> TakenBack | None:
        """Take the registers back; None if the compiled path changed nothing since grant()."""
        length = lib.uart_ports_take(self._ports, self._taken, self._transmitted, self._output)
        if length < 0:
            return None
        taken = self._taken
        return TakenBack(taken.ier, taken.scr, taken.thr_interrupt != 0, taken.irq_level != 0,
                         taken.transmitting_since_ns if taken.transmitting else None,
                         self._transmitted[0], ffi.buffer(self._output, length)[:])

    def take_output(self) -> tuple[int, bytes]:
        """The output gathered so far, and how many bytes were transmitted, leaving the
        registers handed over."""
        length = lib.uart_ports_take_output(self._ports, self._transmitted, self._output)
        return self._transmitted[0], ffi.buffer(self._output, length)[:]

    def grant(self) -> None:
        """Hand over the registers as `registers` holds them."""
        lib.uart_ports_grant(self._ports, self.registers)

    @property
    def output_waiting(self) -> bool:
        """Output gathered since the last take (read without the C lock: exact on the engine's
        thread, which alone adds to it, and on any thread that holds the UART's lock, under
        which every take is made)."""
        return self._ports.output_length > 0

    def take_counts(self) -> tuple[int, int]:
        """Port reads and writes answered here since the last call (on the engine's thread)."""
        ports = self._ports
        ins, outs = ports.ins, ports.outs
        ports.ins = ports.outs = 0
        return ins, outs


def _address(function: str) -> int:
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, function)))
