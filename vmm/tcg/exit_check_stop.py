"""The stop hook's checks (vmm/tcg/stop_hook.py) made in the exit check every block already has,
instead of in a block hook of their own.

Unicorn starts every translated block with a call to
`helper_check_exit_request(uc, 0)`, which leaves the block when another
thread has asked the CPU to exit (QEMU's `cpu_exit`, which `uc_emu_stop`
uses). A `UC_HOOK_BLOCK` adds a second call to every block, with its
arguments and a store of the PC before it: on a Linux boot that second call,
not the few instructions of the hook itself, made the generated code about a
quarter slower and cost about a sixth of the boot's CPU time.

So where it can, pyvmm installs no block hook at all and runs the same checks
at the entry of `helper_check_exit_request`: the function's first
instruction (`mov r8, [rdi + uc.cpu]`, 7 bytes) becomes a jump to this code,
which finds the engine's stop-hook state in a table keyed by the engine
(`uc`, in rdi), does what the block hook does, and either returns for the
original function or goes on into it:

    stub:  mov  rax, table
           cmp  rdi, [rax]             ; the first slot's engine (nearly always the only one)?
           jne  scan
           mov  rcx, [rax + 8]         ; a stop requested or a watch on: the checks below
           or   rcx, [rax + 16]
           jnz  found
           mov  r8, [rdi + 0x1b8]      ; else the original's own check, made here:
           cmp  dword [r8 + 0x8a40], 0 ; uc->cpu's instruction-count word < 0: exit requested
           jl   original
           ret                         ; nothing to do, the common case
    scan:  mov  ecx, SLOTS - 1
      1:   add  rax, 64                ; this engine's slot?
           cmp  rdi, [rax]
           je   found
           dec  ecx
           jnz  1b
           jmp  original               ; an engine without a slot: nothing to check
    found: lea  rcx, [rax + 8]         ; the stop hook's state: the slot's next four words
           cmp  qword [rcx], 0
           jne  stop
           cmp  qword [rcx + 8], 0
           je   original
           cmp  qword [rcx + 16], 0
           je   check
           dec  qword [rcx + 16]       ; let this block start pass
           jmp  original
    check: cmp  qword [rcx + 8], 2
           je   open
           mov  rax, [rcx + 24]        ; the live RFLAGS word
           test dword [rax], 0x200     ; IF
           jz   original
    open:  mov  qword [rcx + 8], 0
           mov  qword [rcx], 1
    stop:  push rdi; push rsi; sub rsp, 8
           mov  rax, uc_emu_stop
           call rax                    ; uc_emu_stop(uc): cpu_exit, which the original sees
           add  rsp, 8; pop rsi; pop rdi
    original:
           mov  r8, [rdi + 0x1b8]      ; the instruction the jump replaced
           jmp  helper_check_exit_request + 7

The first lines up to the `ret` are the path of nearly every block, with no
taken branch before the return. Searching the table first and finishing with
the jump back into the library (four taken branches) made short blocks
costly: a four-instruction kernel loop took 0.96 s of CPU per GiB cleared
instead of 0.78, a shell loop 0.27 s instead of 0.19 (docs/benchmarks.md).
The original's fast path it repeats is two loads and a comparison:
`uc->cpu` at 0x1b8, the CPU's `icount_decr.u32` at 0x8a40
(`cpu_loop_exit_requested`), offsets of the known build, whose bytes the
SHA-256 below pins; the original also tests `in_delay_slot` (esi), which
matters only once an exit is requested, so the stub leaves that case to it.

A slot is a cache line: the engine, then the hook's state, so that a block
start with nothing to do reads one line of the table.
The original then finds the exit requested and leaves the block before its
first instruction, as it does for a block hook's `uc_emu_stop`. The exit
check runs at every block start only while the engine skips the checks after
memory accesses (vmm/tcg/engine.py), so an engine that makes those gets the
block hook. (While a debugger has the engine stop precisely, `stop_precisely`,
the checks after accesses come back: a watch then also counts them, and a
window found after an access in a block stops there, at most the rest of that
block early.)

The change is made once per process, only when the function is byte for
byte the known 2.1.4 build (vmm/tcg/text_patch.py).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading

from vmm.tcg.text_patch import OncePerProcess, free_slot, jump, map_near, sha256, write_text
from vmm.tcg.unicorn_lib import uclib

log = logging.getLogger(__name__)

CHECK_SIZE = 0x78
CHECK_SHA256 = "f33b501f686d26670b5a79eddb71a8518bade6825f7d4fc8fcf27061303a5e5a"
REPLACED_SIZE = 7  # mov r8, [rdi + 0x1b8]
SLOTS = 64  # engines alive at once in one process
SLOT_SIZE = 64  # uc_engine *uc; the stop hook's four words; padding
STATE_WORDS = 4

STUB = (  # hex, with the table's and uc_emu_stop's addresses to fill in
    "48b8{table}483b38751c488b4808480b481075264c8b87b80100004183b8408a0000007c6dc3b93f000000"
    "4883c040483b387406ffc975f3eb58488d4808488339007536488379080074474883791000740648ff4910"
    "eb3a4883790802740c488b4118f70000020000742748c741080000000048c7010100000057564883ec08"
    "48b8{emu_stop}ffd04883c4085e5f4c8b87b8010000e900000000"
)

_lock = threading.Lock()
_table: mmap.mmap | None = None  # the slots, once the library is patched


def _le64(value: int) -> str:
    return value.to_bytes(8, "little").hex()


def _apply() -> bool:
    global _table
    function = ctypes.cast(uclib.helper_check_exit_request_x86_64, ctypes.c_void_p).value
    if sha256(function, CHECK_SIZE) != CHECK_SHA256:
        log.debug("software CPU: libunicorn is not the known 2.1.4 build; the stop hook stays a block hook")
        return False
    table = mmap.mmap(-1, SLOTS * SLOT_SIZE)  # never unmapped: the library's code points at it
    emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
    stub = bytes.fromhex(STUB.format(table=_le64(ctypes.addressof(ctypes.c_char.from_buffer(table))),
                                     emu_stop=_le64(emu_stop)))
    address = map_near(function, stub)
    back = function + REPLACED_SIZE - (address + len(stub))
    write_text(address + len(stub) - 4, back.to_bytes(4, "little", signed=True))  # the last jump's rel32
    jump(function, address)
    write_text(function + 5, bytes.fromhex("66 90"))  # the rest of the replaced instruction, never reached
    _table = table
    return True


_patched = OncePerProcess(_apply, "the stop hook stays a block hook")


class ExitCheckSlot:
    """One engine's entry in the table: while it is claimed, the engine's exit check makes the
    stop hook's checks on `state`, the hook's four words (vmm/tcg/stop_hook.py)."""

    def __init__(self, engine: ctypes.c_uint64, state) -> None:
        self._engine = engine
        self.state = state

    @classmethod
    def claim(cls, handle) -> ExitCheckSlot | None:
        """A slot for the engine `handle`, its state cleared; None if the library is not
        patched or every slot is taken."""
        if not _patched():
            return None
        uc = ctypes.cast(handle, ctypes.c_void_p).value
        with _lock:
            slot = free_slot(_table, SLOTS, SLOT_SIZE, uc)
            if slot is None:
                return None
            state = (ctypes.c_uint64 * STATE_WORDS).from_buffer(_table, slot * SLOT_SIZE + 8)
            ctypes.memset(state, 0, ctypes.sizeof(state))
            engine = ctypes.c_uint64.from_buffer(_table, slot * SLOT_SIZE)
            engine.value = uc  # last: the stub may look at the slot from now on
            return cls(engine, state)

    def release(self) -> None:
        with _lock:
            self._engine.value = 0
