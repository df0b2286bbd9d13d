"""The software CPU's port-I/O and MMIO hooks: guest accesses straight to the machine's buses.

One exit on the software CPU, end to end: guest code runs `out dx, al`
inside `emu_start` (vmm/tcg/vcpu.py); Unicorn calls `IoHooks.port_out`
below, on the vCPU's own thread, which hands the access to `Bus.write`
(vmm/bus.py), which calls the device's `write(offset, size, value)`. This
file and the bus are the whole path; nothing leaves emulation.

On KVM every access is an exit that the exit loop (vmm/vcpu_thread.py)
dispatches. Leaving `emu_start` for each access would cost about 7 us more
than the access itself, so these hooks dispatch directly. They count with
the exit loop's names (`IoOut`, `IoIn`, `MmioWrite`, `MmioRead`), per vCPU,
so that --stats reads the same on both accelerators.

An access that makes the machine stop (the debug-exit port, a power-off)
ends the vCPU's run on KVM at once. Here the rest of the translated block
still executes before the stop hook runs, so the port accesses it makes are
dropped, as if they had not happened.

The IN and OUT hooks are registered through Unicorn's C API with the
binding's own wrapper around the methods below (an exception in them stops
the engine and is re-raised by `emu_start`, as for the binding's hooks),
which saves a Python frame per access over `hook_add`. Where the serial
port's compiled port path is built (devices/uart_ports.py), the hooks are its
C functions, which answer the UART's common-state accesses themselves and
pass everything else to these methods; `slice_ended` then moves what they
counted into the vCPU's and the bus's counts and sends on the output they
gathered.

The output they gathered is also sent on before each access that reaches
these methods is dispatched, so that nothing the guest does after writing it
reaches the host first: another device's output (a Linux guest's serial line
before its virtio-console output, an MMIO queue notification), a reset that
ends the machine (whose status depends on what the firmware said before it,
boot/firmware.py's BootFailureWatch, read by another thread as soon as the
machine stops), or a stop. Only the serial port's own accesses go without
Python, and those keep their order among themselves.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from devices.uart import Uart16550
from devices.uart_ports import LINE_CFUNC, CompiledPorts, use_compiled_ports
from vmm.accel import MachineIo
from vmm.bus import BusRange
from vmm.tcg.engine import Engine
from vmm.tcg.scheduler import CpuScheduler
from vmm.tcg.unicorn_lib import (
    HOOK_INSN_IN_CFUNC,
    HOOK_INSN_OUT_CFUNC,
    uc_const,
    uc_hook_h,
    uccallback,
    uclib,
    x86,
)

if TYPE_CHECKING:
    from devices.interrupts import InterruptRouter


class IoHooks:
    """Installed once on the shared engine; each access goes to the vCPU that owns the CPU."""

    def __init__(self, scheduler: CpuScheduler, io: MachineIo, router: InterruptRouter | None,
                 timer_moved: Callable[[], None]) -> None:
        self.scheduler = scheduler
        self.pio = io.pio
        self.mmio = io.mmio
        # Only an access that moved a timer (PIT, port 0x61, a local APIC) needs the
        # slice's alarm re-armed (`timer_moved`): not the ~17,000 console writes of a boot.
        self.router = router
        self.timer_moved = timer_moved
        self.serial: tuple[CompiledPorts, Uart16550, BusRange] | None = None  # the compiled port path
        self._python_in = self._python_out = None  # the hooks' Python callbacks, once hooked
        self._python_line = None  # the compiled port path's interrupt line callback

    def install(self, engine: Engine, mmio_start: int, mmio_end: int) -> None:
        """Map [mmio_start, mmio_end) as MMIO. Unicorn's MMIO callbacks take at most 4 bytes,
        so an 8-byte access arrives as two, low half first."""
        self.mmio_start = mmio_start
        engine.map_mmio(mmio_start, mmio_end - mmio_start, self.mmio_read, self.mmio_write)

    def hook_ports(self, engine: Engine) -> None:
        """Hook IN and OUT, once the devices are on the port bus (the serial port among them
        may get its compiled path); again does nothing."""
        if self._python_in is not None:
            return
        uc = engine.uc
        self._python_in = uccallback(uc, HOOK_INSN_IN_CFUNC)(self.port_in)
        self._python_out = uccallback(uc, HOOK_INSN_OUT_CFUNC)(self.port_out)
        python_in, python_out = _address(self._python_in), _address(self._python_out)
        uart = next((r for r in self.pio.ranges if isinstance(r.device, Uart16550)), None)
        if uart is None or not use_compiled_ports():
            _add_port_hook(engine, x86.UC_X86_INS_IN, python_in, None)
            _add_port_hook(engine, x86.UC_X86_INS_OUT, python_out, None)
        else:
            device = uart.device
            self._python_line = uccallback(uc, LINE_CFUNC)(lambda uc, level: device.drive_line(bool(level)))
            compiled = CompiledPorts(uart.base, ctypes.addressof(engine.stop_hook.state), python_in, python_out,
                                     _address(self._python_line))
            self.serial = (compiled, uart.device, uart)
            uart.device.attach_compiled_ports(compiled)
            _add_port_hook(engine, x86.UC_X86_INS_IN, compiled.port_in_address, compiled.user_data)
            _add_port_hook(engine, x86.UC_X86_INS_OUT, compiled.port_out_address, compiled.user_data)

    def slice_ended(self, io_counts: Counter[str]) -> None:
        """After each slice, on its vCPU's thread: count what the compiled port path answered
        (into that vCPU's `io_counts`), and send on the output it gathered."""
        if self.serial is None:
            return
        compiled, uart, bus_range = self.serial
        ins, outs = compiled.take_counts()
        if ins or outs:
            io_counts["IoIn"] += ins
            io_counts["IoOut"] += outs
            bus_range.accesses += ins + outs
        uart.flush_compiled()

    def _serial_output_first(self) -> None:
        """Send on the serial output the compiled port path gathered, before what comes after it."""
        if self.serial is not None:
            self.serial[1].flush_compiled()

    def port_out(self, uc, port: int, size: int, value: int, user_data) -> None:
        self._serial_output_first()
        vcpu = self.scheduler.owner
        if vcpu.kick_pending:
            return
        vcpu.io_counts["IoOut"] += 1
        router = self.router
        if router is None:
            self.pio.write(port, size, value & ((1 << (8 * size)) - 1))
            return
        changes = router.deadline_changes
        self.pio.write(port, size, value & ((1 << (8 * size)) - 1))
        if router.deadline_changes != changes:
            self.timer_moved()

    def port_in(self, uc, port: int, size: int, user_data) -> int:
        self._serial_output_first()
        vcpu = self.scheduler.owner
        if vcpu.kick_pending:
            return (1 << (8 * size)) - 1
        vcpu.io_counts["IoIn"] += 1
        return self.pio.read(port, size)

    # The MMIO callbacks get the offset into the window that `install` mapped.

    def mmio_read(self, uc, offset: int, size: int, user_data) -> int:
        self._serial_output_first()
        self.scheduler.owner.io_counts["MmioRead"] += 1
        return self.mmio.read(self.mmio_start + offset, size)

    def mmio_write(self, uc, offset: int, size: int, value: int, user_data) -> None:
        self._serial_output_first()
        self.scheduler.owner.io_counts["MmioWrite"] += 1
        router = self.router
        if router is None:
            self.mmio.write(self.mmio_start + offset, size, value)
            return
        changes = router.deadline_changes
        self.mmio.write(self.mmio_start + offset, size, value)
        if router.deadline_changes != changes:
            self.timer_moved()


def _address(callback) -> int:
    return ctypes.cast(callback, ctypes.c_void_p).value


def _add_port_hook(engine: Engine, instruction: int, callback: int, user_data: int | None) -> None:
    """A UC_HOOK_INSN for IN or OUT calling `callback` (a C function pointer) with `user_data`."""
    handle = uc_hook_h()
    status = uclib.uc_hook_add(engine.uc._uch, ctypes.byref(handle), uc_const.UC_HOOK_INSN, ctypes.c_void_p(callback),
                               ctypes.c_void_p(user_data), ctypes.c_uint64(1), ctypes.c_uint64(0),
                               ctypes.c_int(instruction))
    if status != uc_const.UC_ERR_OK:
        raise RuntimeError(f"uc_hook_add(UC_HOOK_INSN) failed with error {status}")
