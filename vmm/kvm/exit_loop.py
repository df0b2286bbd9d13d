"""The compiled KVM exit loop's Python side, and whether it is used.

pyvmm has two ways from KVM_RUN to a device on KVM:

- the Python loop, always there: `KvmVcpu.run` (vcpu.py) enters the guest
  with `VcpuFd.run` and returns every exit as a value; `VcpuThread._loop`
  (vmm/vcpu_thread.py) hands port and MMIO exits to the buses.
- the compiled loop, when `make install` or `pip install` could build
  vmm/kvm/exit_loop.c (exit_loop_build.py; it needs a C compiler and
  Python's headers): `KvmVcpu.run` enters the guest through
  `CompiledExitLoop.run` instead, and exit_loop.c decodes port and MMIO
  exits in C, calls the four functions at the bottom of this file for the
  device access (`Bus.read` / `Bus.write`, nothing else), and enters the
  guest again. Every other exit comes back to `KvmVcpu.run` and is decoded
  the same way as in the Python loop. Like the software CPU, it hands I/O to
  the buses itself, so `VcpuThread._loop` sees no I/O exits; their counts come
  from `dispatched_io_counts`.

Both do the same thing; the compiled one costs less Python per exit (no
exit value, no ioctl call through libffi, no dispatch). PYVMM_EXIT_LOOP=python
chooses the Python loop even where the compiled one was built (the tests run
guests through each).
"""

from __future__ import annotations

import os
import threading

from vmm.accel import MachineIo
from vmm.compiled_module import built_from_sources
from vmm.kvm import ioctls
from vmm.kvm.exit_loop_build import source_digest
from vmm.kvm.fd import KvmError

LOOP_ENV = "PYVMM_EXIT_LOOP"  # "python": use the Python loop

try:
    from vmm.kvm._exit_loop import ffi, lib
except ImportError:  # not built: no compiler at install time, or never installed
    ffi = lib = None


def compiled_loop_built() -> bool:
    """True when the compiled loop was built from the exit_loop.c beside this file.

    A module built from another version of the source (exit_loop.c changed, `make install`
    not run since) is not used: it could disagree with the Python side here."""
    return built_from_sources(lib, "EXIT_LOOP_DIGEST", source_digest())


def use_compiled_loop() -> bool:
    return os.environ.get(LOOP_ENV) != "python" and compiled_loop_built()


class CompiledExitLoop:
    """One vCPU's compiled loop: KVM_RUN until an exit that is not port or MMIO I/O."""

    def __init__(self, fd: int, kvm_run_address: int, io: MachineIo) -> None:
        self._fd = fd
        self._run = ffi.cast("struct kvm_run *", kvm_run_address)
        self._handle = ffi.new_handle(self)  # what exit_loop.c hands back to the device calls
        self._counts = ffi.new("struct exit_counts *")
        self._error = ffi.new("int *")
        self.pio_write, self.pio_read = io.pio.write, io.pio.read
        self.mmio_write, self.mmio_read = io.mmio.write, io.mmio.read

    def run(self) -> bool:
        """Run the guest until it needs Python; False when interrupted (EINTR, EAGAIN), as `VcpuFd.run`."""
        status = lib.exit_loop_run(self._fd, self._run, self._handle, self._counts, self._error)
        if status == lib.LOOP_EXIT:
            return True
        if status == lib.LOOP_INTERRUPTED:
            return False
        if status == lib.LOOP_DEVICE_RAISED:
            raised, _raised.exception = _raised.exception, None
            raise raised or RuntimeError("a device call failed without an exception")
        raise KvmError(ioctls.KVM_RUN, self._error[0])

    def io_counts(self) -> dict[str, int]:
        """The I/O exits handled so far (those that happened), named as the Python loop counts them."""
        counts = self._counts
        named = {"IoOut": counts.io_out, "IoIn": counts.io_in, "MmioWrite": counts.mmio_write,
                 "MmioRead": counts.mmio_read}
        return {name: count for name, count in named.items() if count}


# The device calls exit_loop.c makes, with the GIL held: each returns 0, or -1 when the device
# raised (cffi's `error`), and run() raises the same exception on the vCPU's thread. Each is
# written out rather than made by a shared wrapper: every port and MMIO exit runs one, and a
# wrapper's extra frame and argument tuples were a fifth of the Python an exit costs.
def _keep_raised(exception_type, exception, traceback) -> None:
    """cffi's onerror: what a device call raised, for run() on this thread to raise."""
    _raised.exception = exception


class _Raised(threading.local):
    """What a device call raised, per vCPU thread (each runs its own loop)."""

    exception: BaseException | None = None


_raised = _Raised()

if lib is not None:
    _loop_of = ffi.from_handle  # looked up once: `ffi.from_handle` makes a method object each time

    @ffi.def_extern(error=-1, onerror=_keep_raised)
    def exit_loop_pio_write(handle, port, size, value):
        _loop_of(handle).pio_write(port, size, value)
        return 0

    @ffi.def_extern(error=-1, onerror=_keep_raised)
    def exit_loop_pio_read(handle, port, size, value):
        value[0] = _loop_of(handle).pio_read(port, size)
        return 0

    @ffi.def_extern(error=-1, onerror=_keep_raised)
    def exit_loop_mmio_write(handle, address, size, value):
        _loop_of(handle).mmio_write(address, size, value)
        return 0

    @ffi.def_extern(error=-1, onerror=_keep_raised)
    def exit_loop_mmio_read(handle, address, size, value):
        value[0] = _loop_of(handle).mmio_read(address, size)
        return 0
