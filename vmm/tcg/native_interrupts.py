"""External interrupts delivered by QEMU's own code inside the engine, not built in Python.

Unicorn offers no way to inject an interrupt, so pyvmm built every
interrupt frame in Python (vmm/tcg/delivery.py), about 60 us each, before
the slice that takes it. QEMU's path for it is still in the library: when a
CPU's `interrupt_request` has CPU_INTERRUPT_HARD set, the execution loop
(before it runs the first block, and at every block boundary after)
calls `x86_cpu_exec_interrupt`, which, if RFLAGS.IF is set and no
interrupt shadow is active, vectors the interrupt through the guest's IVT or
IDT with QEMU's `do_interrupt_x86_hardirq`. Unicorn left that in place but
replaced the question to the interrupt controller by `intno = 0`.

This module puts the question back: the `mov edx, 1; xor esi, esi` that
passes `is_hw = 1, intno = 0` jumps instead to a few instructions that look
the CPU up in a table of pyvmm's engines and pass the vector pyvmm stored
for it (an engine not in the table still gets 0, as before):

    mov  edx, 1
    mov  rax, [table]
    mov  ecx, SLOTS
  1: cmp rbp, [rax]              ; rbp = the CPUState of the interrupted CPU
    je   2f
    add  rax, 16; dec ecx; jnz 1b
    xor  esi, esi;  jmp [back]
  2: mov esi, [rax + 8];  jmp [back]

`Injector.inject(vector)` stores the vector in the engine's slot and sets
CPU_INTERRUPT_HARD; the vCPU (vmm/tcg/vcpu.py) does it between slices, with
the interrupt already acknowledged at the controller and only when the guest
can take it, so the engine delivers it before the first instruction of the
next slice. A fault while QEMU builds the frame is raised inside the engine
like any guest fault (to vmm/tcg/native_exceptions.py's hook).

`inject_running(vector)` does the same from one of the engine's own hooks (a
guest's device access raised the interrupt), and also stores -1 in the high
half of the CPU's instruction-count word, as QEMU's `cpu_interrupt` does on
the CPU's own thread (Unicorn's version of it no longer does): the check at
the start of every translated block sees it, goes back to the execution
loop, and the loop delivers the interrupt before the next block, without
leaving `emu_start`. The word's address comes from the library's own
`cpu_exit` (vmm/tcg/unicorn_lib.py); if that code is not as expected, only
`inject` is available.

The change is made once per process, only when the function is byte for
byte the known 2.1.4 build (vmm/tcg/text_patch.py); otherwise `Injector`
is not available and Python delivers as before.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading

from vmm.tcg.text_patch import free_slot, jump, map_near, sha256, write_text
from vmm.tcg.unicorn_lib import cpu_icount_decr_ptr_offset, uc_cpu_offset, uclib

log = logging.getLogger(__name__)

EXEC_INTERRUPT_SIZE = 0x1A3
EXEC_INTERRUPT_SHA256 = "aa0d95bb25fc0e5e3c00fc5633a4e53739771251e95635213ead8d738a86c28d"
SITE = 0x106  # mov edx, 1; xor esi, esi (7 bytes)
SITE_SIZE = 7
SLOTS = 64  # engines alive at once in one process
SLOT_SIZE = 16  # CPUState *cpu; u32 vector; pad
# CPUState.interrupt_request (the HARD case clears its bits with `and [rbp + 0x1c], ...`).
INTERRUPT_REQUEST = 0x1C
CPU_INTERRUPT_HARD = 0x0002

REPLACEMENT = bytes.fromhex(
    "ba01000000488b0524000000b940000000483b2874104883c010ffc975f331f6ff2512000000"
    "8b7008ff250900000090"
)

_lock = threading.Lock()
_table: mmap.mmap | None = None  # the slots, once the library is patched
_state: bool | None = None  # None: not tried yet


def _patched() -> bool:
    global _state, _table
    with _lock:
        if _state is None:
            try:
                _table = _apply()
                _state = _table is not None
            except OSError as err:
                log.debug("software CPU: external interrupts left to Python (%s)", err)
                _state = False
        return _state


def _apply() -> mmap.mmap | None:
    function = ctypes.cast(uclib.x86_cpu_exec_interrupt_x86_64, ctypes.c_void_p).value
    if sha256(function, EXEC_INTERRUPT_SIZE) != EXEC_INTERRUPT_SHA256 or uc_cpu_offset() is None:
        log.debug("software CPU: libunicorn is not the known 2.1.4 build; external interrupts left to Python")
        return None
    table = mmap.mmap(-1, SLOTS * SLOT_SIZE)  # never unmapped: the library's code points at it
    site = function + SITE
    code = (REPLACEMENT + ctypes.addressof(ctypes.c_char.from_buffer(table)).to_bytes(8, "little")
            + (site + SITE_SIZE).to_bytes(8, "little"))
    jump(site, map_near(site, code))
    write_text(site + 5, bytes.fromhex("66 90"))  # the rest of `xor esi, esi`, never reached
    return table


class Injector:
    """One engine's way to hand the engine an external interrupt to deliver."""

    def __init__(self, slot: int, cpu: int) -> None:
        base = ctypes.addressof(ctypes.c_char.from_buffer(_table)) + slot * SLOT_SIZE
        self._cpu = ctypes.c_uint64.from_address(base)
        self._vector = ctypes.c_uint32.from_address(base + 8)
        self._request = ctypes.c_uint32.from_address(cpu + INTERRUPT_REQUEST)
        self._cpu.value = cpu
        # The high half of the CPU's IcountDecr word (None: not found in this library).
        pointer_offset = cpu_icount_decr_ptr_offset()
        self._exit_check: ctypes.c_uint16 | None = None
        if pointer_offset is not None:
            icount_decr = ctypes.c_uint64.from_address(cpu + pointer_offset).value
            self._exit_check = ctypes.c_uint16.from_address(icount_decr + 2)

    @classmethod
    def for_engine(cls, handle) -> Injector | None:
        """An injector for the engine `handle` (after its first use), None if pyvmm cannot inject."""
        if not _patched():
            return None
        uc = ctypes.cast(handle, ctypes.c_void_p).value
        cpu = ctypes.c_uint64.from_address(uc + uc_cpu_offset()).value
        with _lock:
            slot = free_slot(_table, SLOTS, SLOT_SIZE, cpu)
            return None if slot is None else cls(slot, cpu)

    @property
    def pending(self) -> bool:
        """An injected interrupt the engine has not delivered yet."""
        return bool(self._request.value & CPU_INTERRUPT_HARD)

    def inject(self, vector: int) -> None:
        self._vector.value = vector
        self._request.value |= CPU_INTERRUPT_HARD

    @property
    def can_inject_running(self) -> bool:
        return self._exit_check is not None

    def inject_running(self, vector: int) -> None:
        """From a hook of the running engine: delivered before the next translated block."""
        self.inject(vector)
        self._exit_check.value = 0xFFFF

    def withdraw(self) -> int | None:
        """Take back an interrupt still pending (its vector), so that it is not delivered later."""
        if not self.pending:
            return None
        self._request.value &= ~CPU_INTERRUPT_HARD
        return self._vector.value

    def close(self) -> None:
        with _lock:
            self._cpu.value = 0
