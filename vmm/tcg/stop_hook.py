"""A block hook that stops the emulation when a flag is set, cheap enough to run on every block.

A guest that never exits (a busy loop with interrupts enabled) must still be
stopped so that timer interrupts can be delivered and other vCPUs can run.
Calling `uc_emu_stop` from another thread correlated with crashes
(PLATFORM.md), `emu_start(timeout=...)` does exactly that from a helper
thread, and `emu_start(count=...)` installs a per-instruction hook. What is
left is a `UC_HOOK_BLOCK` that calls `uc_emu_stop` itself, on the emulating
thread, when another thread has set a flag.

Written in Python that hook costs about 1 us per translated block and slows
the guest about tenfold. So on x86-64 hosts it is six machine instructions
in an executable page, called directly by Unicorn (no GIL, no ctypes):

    cmp  qword [rcx], 0      ; rcx = user_data = &flag
    jne  stop
    ret
  stop:
    mov  rax, uc_emu_stop
    jmp  rax                 ; tail call uc_emu_stop(uc): rdi still holds uc

Measured on a register/memory loop: no measurable slowdown against no hook.
Elsewhere a Python hook does the same job, slowly.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform

from vmm.tcg.unicorn_lib import Uc, uc_const, uc_hook_h, uclib

log = logging.getLogger(__name__)


def _machine_code(emu_stop_address: int) -> bytes:
    return (
        bytes.fromhex("48 83 39 00")  # cmp qword [rcx], 0
        + bytes.fromhex("75 01")  # jne +1
        + bytes.fromhex("c3")  # ret
        + bytes.fromhex("48 b8") + emu_stop_address.to_bytes(8, "little")  # movabs rax, imm64
        + bytes.fromhex("ff e0")  # jmp rax
    )


class StopHook:
    """Stops `emu_start` at the next block boundary once `request()` has been called.

    `request` may be called from any thread; the stop itself always happens on
    the emulating thread. `clear` re-arms it before the next `emu_start`.
    """

    def __init__(self, uc: Uc) -> None:
        self.flag = ctypes.c_uint64(0)
        self._code_page: mmap.mmap | None = None
        self.native = False
        if platform.machine() in ("x86_64", "AMD64"):
            try:
                self._install_native(uc)
                self.native = True
            except (OSError, ValueError) as err:  # e.g. a host that forbids executable mappings
                log.warning("software CPU: native stop hook unavailable (%s); guests will run slower", err)
        if not self.native:
            uc.hook_add(uc_const.UC_HOOK_BLOCK, self._python_hook)

    def _install_native(self, uc: Uc) -> None:
        emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(_machine_code(emu_stop))
        self._code_page = page
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        handle = uc_hook_h()
        status = uclib.uc_hook_add(
            uc._uch, ctypes.byref(handle), uc_const.UC_HOOK_BLOCK, ctypes.c_void_p(address),
            ctypes.cast(ctypes.pointer(self.flag), ctypes.c_void_p), ctypes.c_uint64(1), ctypes.c_uint64(0),
        )
        if status != uc_const.UC_ERR_OK:
            raise ValueError(f"uc_hook_add failed with error {status}")

    def _python_hook(self, uc: Uc, address: int, size: int, user_data) -> None:
        if self.flag.value:
            uc.emu_stop()

    def request(self) -> None:
        self.flag.value = 1

    def clear(self) -> None:
        self.flag.value = 0

    @property
    def requested(self) -> bool:
        return self.flag.value != 0
