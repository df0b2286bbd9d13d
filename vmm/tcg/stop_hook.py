"""A block hook that stops the emulation when a flag is set, or when an interrupt window opens,
cheap enough to run on every block.

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

On a register/memory loop that looked free, but it is not: a block hook
adds a call (with its arguments and a store of the PC) to every translated
block, and on a Linux boot that made the generated code about a quarter
slower. So where the library allows it, these checks are made without a
block hook, in the exit check every block already calls
(vmm/tcg/exit_check_stop.py, `in_exit_check`); the block hook below is the
fallback. Elsewhere (not x86-64) a Python hook does the same job, slowly.

The same hook finds interrupt windows exactly. An interrupt that is pending
while the guest cannot take it (RFLAGS.IF clear, the one-instruction shadow
of STI or MOV SS, an NMI while the previous NMI's handler runs) must be
delivered as soon as the guest can take it: QEMU's translator ends a block
right after every instruction that can open that window (STI and the
instruction in its shadow, POPF, IRET), so looking at each block start is
exact. While the vCPU asks for it (`watch_*`), the hook lets a number of
block starts pass, then stops at the first one where IF is set, or at the
next one whatever IF is (an NMI: only IRET unblocks it, and NMI blocking is
not readable through Unicorn's API). With no watch the hook costs one more
comparison. Its state is four words:

    [0] stop requested     [1] watch: 0 none, 1 until IF is set, 2 any block
    [2] block starts to let pass first
    [3] where IF is read: the engine's live RFLAGS word (QEMU keeps IF in
        `env->eflags` as it runs), or scratch for `uc_reg_read`

    hook:  cmp  qword [rcx], 0          ; rcx = user_data = the state
           jne  stop
           cmp  qword [rcx+8], 0
           jne  watch
           ret
    watch: cmp  qword [rcx+16], 0
           je   check
           dec  qword [rcx+16]          ; let this block start pass
           ret
    check: cmp  qword [rcx+8], 2
           je   open
           mov  rax, [rcx+24]           ; the live RFLAGS word
           test dword [rax], 0x200      ; IF
           jnz  open
           ret
    open:  mov  qword [rcx+8], 0        ; the window is open: stop as requested
           mov  qword [rcx], 1
    stop:  mov  rax, uc_emu_stop
           jmp  rax                     ; tail call uc_emu_stop(uc): rdi still holds uc

Reading the word directly matters: a guest runs long stretches with
interrupts disabled while one is pending (a timer that fell due in a
critical section), and every block start of those stretches is a check.
`uc_reg_read(EFLAGS)` there, which also folds in the lazily computed
arithmetic flags, cost a Linux boot on the software CPU about a tenth of its
time. Where the word's address cannot be found (the offsets are read from
the library's code, vmm/tcg/unicorn_lib.py), `check` calls `uc_reg_read`
instead, into state[3]:

           push rbx                     ; keep the state and uc, align the stack
           push rdi
           sub  rsp, 8
           mov  rbx, rcx
           mov  esi, UC_X86_REG_EFLAGS
           lea  rdx, [rcx+24]
           mov  rax, uc_reg_read
           call rax                     ; uc_reg_read(uc, EFLAGS, &state[3])
           add  rsp, 8
           pop  rdi
           mov  rcx, rbx
           pop  rbx
           test dword [rcx+24], 0x200   ; IF
           jnz  open
           ret
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform

from vmm.cpu_state import RFLAGS_IF
from vmm.tcg.exit_check_stop import ExitCheckSlot
from vmm.tcg.qemu_env import OFF_EFLAGS
from vmm.tcg.unicorn_lib import Uc, cpu_env_offset, uc_const, uc_cpu_offset, uc_hook_h, uclib, x86

log = logging.getLogger(__name__)

STOP, WATCH, SKIP, SCRATCH = range(4)  # the hook's state words (SCRATCH: where IF is read)
WATCH_NONE, WATCH_INTERRUPT_FLAG, WATCH_ANY_BLOCK = 0, 1, 2


def _read_flags_directly() -> bytes:
    """`check`'s read of IF from the live RFLAGS word whose address is in state[3]; ZF clear if set."""
    return b"".join([
        bytes.fromhex("48 8b 41 18"),            #        mov rax, [rcx+24]
        bytes.fromhex("f7 00") + RFLAGS_IF.to_bytes(4, "little"),  # test dword [rax], IF
    ])


def _read_flags_through_the_api(reg_read_address: int) -> bytes:
    """`check`'s read of IF through uc_reg_read into state[3]; ZF clear if set."""
    return b"".join([
        bytes.fromhex("53 57 48 83 ec 08"),      #        push rbx; push rdi; sub rsp, 8
        bytes.fromhex("48 89 cb"),               #        mov rbx, rcx
        bytes.fromhex("be") + x86.UC_X86_REG_EFLAGS.to_bytes(4, "little"),  # mov esi, EFLAGS
        bytes.fromhex("48 8d 51 18"),            #        lea rdx, [rcx+24]
        bytes.fromhex("48 b8") + reg_read_address.to_bytes(8, "little"),   # movabs rax, uc_reg_read
        bytes.fromhex("ff d0"),                  #        call rax
        bytes.fromhex("48 83 c4 08 5f"),         #        add rsp, 8; pop rdi
        bytes.fromhex("48 89 d9 5b"),            #        mov rcx, rbx; pop rbx
        bytes.fromhex("f7 41 18") + RFLAGS_IF.to_bytes(4, "little"),  # test dword [rcx+24], IF
    ])


def _machine_code(emu_stop_address: int, read_flags: bytes) -> bytes:
    """The hook in the module docstring, with `read_flags` as check's read of IF."""
    check_tail = read_flags + bytes.fromhex("75 01 c3")  # jnz open; ret
    open_ = bytes.fromhex("48 c7 41 08 00 00 00 00") + bytes.fromhex("48 c7 01 01 00 00 00")
    check = bytes.fromhex("48 83 79 08 02") + bytes((0x74, len(check_tail))) + check_tail  # je open
    watch = (bytes.fromhex("48 83 79 10 00") + bytes.fromhex("74 05")  # je check
             + bytes.fromhex("48 ff 49 10") + bytes.fromhex("c3"))
    after_jne_stop = bytes.fromhex("48 83 79 08 00") + bytes.fromhex("75 01") + bytes.fromhex("c3")
    to_stop = len(after_jne_stop) + len(watch) + len(check) + len(open_)
    return b"".join([
        bytes.fromhex("48 83 39 00"),            # hook:  cmp qword [rcx], 0
        bytes((0x75, to_stop)),                  #        jne stop
        after_jne_stop,                          #        cmp qword [rcx+8], 0; jne watch; ret
        watch,
        check,
        open_,
        bytes.fromhex("48 b8") + emu_stop_address.to_bytes(8, "little"),   # stop: movabs rax, uc_emu_stop
        bytes.fromhex("ff e0"),                  #        jmp rax
    ])


def live_rflags_address(handle) -> int | None:
    """The address of the engine's running RFLAGS word (`env->eflags`), None if not found."""
    cpu_offset, env_offset = uc_cpu_offset(), cpu_env_offset()
    if cpu_offset is None or env_offset is None:
        return None
    cpu = ctypes.c_uint64.from_address(ctypes.cast(handle, ctypes.c_void_p).value + cpu_offset).value
    return cpu + env_offset + OFF_EFLAGS if cpu else None


class StopHook:
    """Stops `emu_start` at the next block boundary once `request()` has been called.

    `request` may be called from any thread; the stop itself always happens on
    the emulating thread. `clear` re-arms it before the next `emu_start`.
    """

    def __init__(self, uc: Uc, *, exit_check_per_block: bool) -> None:
        """`exit_check_per_block`: the engine's exit check runs at block starts only (no
        checks after memory accesses), so the checks can be made there
        (vmm/tcg/exit_check_stop.py) instead of in a block hook."""
        self.state = (ctypes.c_uint64 * (SCRATCH + 1))()
        self._code_page: mmap.mmap | None = None
        self._slot: ExitCheckSlot | None = None  # the checks run in the engine's exit check
        self.native = False
        self.reads_rflags_directly = False  # the native hook's read of IF (module docstring)
        if platform.machine() in ("x86_64", "AMD64"):
            rflags = live_rflags_address(uc._uch)
            if rflags is not None:
                if exit_check_per_block:
                    self._slot = ExitCheckSlot.claim(uc._uch)
                    if self._slot is not None:
                        self.state = self._slot.state
                self.state[SCRATCH] = rflags
                self.reads_rflags_directly = True
            try:
                if self._slot is None:
                    self._install_native(uc)
                self.native = True
            except (OSError, ValueError) as err:  # e.g. a host that forbids executable mappings
                log.warning("software CPU: native stop hook unavailable (%s); guests will run slower", err)
        if not self.native:
            uc.hook_add(uc_const.UC_HOOK_BLOCK, self._python_hook)

    @property
    def in_exit_check(self) -> bool:
        """Whether the checks run in the engine's exit check, with no block hook."""
        return self._slot is not None

    def close(self) -> None:
        """The engine is closing: give up its place in the exit check's table."""
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def _install_native(self, uc: Uc) -> None:
        emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        if self.reads_rflags_directly:
            read_flags = _read_flags_directly()
        else:
            read_flags = _read_flags_through_the_api(ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value)
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(_machine_code(emu_stop, read_flags))
        self._code_page = page
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        handle = uc_hook_h()
        status = uclib.uc_hook_add(
            uc._uch, ctypes.byref(handle), uc_const.UC_HOOK_BLOCK, ctypes.c_void_p(address),
            ctypes.cast(self.state, ctypes.c_void_p), ctypes.c_uint64(1), ctypes.c_uint64(0),
        )
        if status != uc_const.UC_ERR_OK:
            raise ValueError(f"uc_hook_add failed with error {status}")

    def _python_hook(self, uc: Uc, address: int, size: int, user_data) -> None:
        state = self.state
        if not state[STOP]:
            if not state[WATCH]:
                return
            if state[SKIP]:
                state[SKIP] -= 1
                return
            if state[WATCH] == WATCH_INTERRUPT_FLAG and not uc.reg_read(x86.UC_X86_REG_EFLAGS) & RFLAGS_IF:
                return
            state[WATCH] = WATCH_NONE
            state[STOP] = 1
        uc.emu_stop()

    def request(self) -> None:
        self.state[STOP] = 1

    def clear(self) -> None:
        """Re-arm for the next emu_start: no stop requested, no window watched."""
        self.state[STOP] = 0
        self.state[WATCH] = WATCH_NONE

    def watch_interrupt_flag(self, skip_blocks: int) -> None:
        """Stop at the first block start after `skip_blocks` more where RFLAGS.IF is set."""
        self.state[SKIP] = skip_blocks
        self.state[WATCH] = WATCH_INTERRUPT_FLAG

    def watch_blocks_ahead(self, count: int) -> None:
        """Stop at the start of the `count`th block after the current one."""
        self.state[SKIP] = count
        self.state[WATCH] = WATCH_ANY_BLOCK

    def stop_at_interrupt_window(self) -> None:
        """Stop at the first block start where RFLAGS.IF is set; at the next one if a watch
        for something else (an NMI's) is on."""
        watch = self.state[WATCH]
        if watch == WATCH_NONE:
            self.watch_interrupt_flag(skip_blocks=0)
        elif watch != WATCH_INTERRUPT_FLAG:
            self.request()

    @property
    def watching(self) -> bool:
        return self.state[WATCH] != WATCH_NONE

    @property
    def requested(self) -> bool:
        return self.state[STOP] != 0
