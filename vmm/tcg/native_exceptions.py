"""Page faults delivered by QEMU's own code inside Unicorn, without a trip through Python.

Unicorn hands every guest exception to its `UC_HOOK_INTR` callbacks instead
of vectoring through the guest's IDT, and pyvmm builds the interrupt frame in
Python (vmm/tcg/delivery.py): about 60 us per event. A Linux guest that forks
and execs takes thousands of page faults a second (demand paging,
copy-on-write), which put a fifth of a busy guest's time in that Python.

QEMU's delivery code is still in the library: `x86_cpu_do_interrupt(cpu)`
is what QEMU's own exception loop calls at the same point, and it vectors
the pending exception (`cpu->exception_index`, with the error code, CR2 and
return address QEMU recorded when it raised it) through the guest's IDT,
TSS and IST stacks, and clears the "exception in flight" marker. A fault
while it builds the frame is raised the way any guest fault is (QEMU makes a
#PF during #PF delivery a #DF), and comes back to this hook as that vector.

So the `UC_HOOK_INTR` callback is six machine instructions in an
executable page (the pattern of vmm/tcg/stop_hook.py):

    cmp   esi, 14                ; the vector: a page fault?
    jne   python
    mov   rdi, [rdi + uc.cpu]    ; uc->cpu
    jmp   [rdx + 8]              ; tail call x86_cpu_do_interrupt(cpu)
  python:
    jmp   [rdx]                  ; tail call the Python callback (uc, vector, user_data)

with rdx = user_data, a table of the two targets. Every other vector (int n,
the debugger's #DB and #BP, #UD, #DF, the triple fault pyvmm must see) still
reaches Python. The offset of `cpu` in `uc_struct` is read from the library's
own `uc_emu_stop`, which loads it (`mov rdi, [rdi + cpu]; test rdi, rdi`)
before calling `cpu_exit`; where it is not found, or the host is not x86-64,
all vectors go to Python as before.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform
from collections.abc import Callable

from vmm.tcg.unicorn_lib import (
    HOOK_INTR_CFUNC,
    Uc,
    uc_const,
    uc_cpu_offset,
    uc_hook_h,
    uccallback,
    uclib,
)

log = logging.getLogger(__name__)

PAGE_FAULT = 14

def _machine_code(cpu_offset: int) -> bytes:
    return (
        bytes.fromhex("83 fe") + bytes((PAGE_FAULT,))  # cmp esi, 14
        + bytes.fromhex("75 0a")  # jne python
        + bytes.fromhex("48 8b bf") + cpu_offset.to_bytes(4, "little")  # mov rdi, [rdi + cpu]
        + bytes.fromhex("ff 62 08")  # jmp [rdx + 8]
        + bytes.fromhex("ff 22")  # python: jmp [rdx]
    )


class ExceptionHook:
    """The engine's one `UC_HOOK_INTR`: page faults delivered natively, the rest to `on_exception(vector)`."""

    def __init__(self, uc: Uc, on_exception: Callable[[int], None]) -> None:
        # The binding's own wrapper: an exception raised in Python stops the
        # engine and is re-raised by emu_start, as for the binding's hooks.
        self._callback = uccallback(uc, HOOK_INTR_CFUNC)(lambda uc, vector, user_data: on_exception(vector))
        self._code_page: mmap.mmap | None = None
        cpu_offset = uc_cpu_offset() if platform.machine() in ("x86_64", "AMD64") else None
        self.native = cpu_offset is not None
        if not self.native:
            log.warning("software CPU: native page-fault delivery unavailable; guests will run slower")
            self._add(uc, ctypes.cast(self._callback, ctypes.c_void_p).value, None)
            return
        do_interrupt = ctypes.cast(uclib.x86_cpu_do_interrupt_x86_64, ctypes.c_void_p).value
        self._targets = (ctypes.c_void_p * 2)(ctypes.cast(self._callback, ctypes.c_void_p).value, do_interrupt)
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(_machine_code(cpu_offset))
        self._code_page = page
        self._add(uc, ctypes.addressof(ctypes.c_char.from_buffer(page)), ctypes.addressof(self._targets))

    def _add(self, uc: Uc, callback: int, user_data: int | None) -> None:
        handle = uc_hook_h()
        status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), uc_const.UC_HOOK_INTR, ctypes.c_void_p(callback),
                                   ctypes.c_void_p(user_data), ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != uc_const.UC_ERR_OK:
            raise RuntimeError(f"uc_hook_add(UC_HOOK_INTR) failed with error {status}")
