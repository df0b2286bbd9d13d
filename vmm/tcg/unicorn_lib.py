"""The Unicorn library, imported once, with the exact version pyvmm was written against.

The software CPU relies on details of Unicorn 2.1.4 that no API promises:
the layout of QEMU's CPU state inside a saved context (vmm/tcg/qemu_env.py),
that SYSCALL only calls the hook and then advances RIP, that exceptions stop
at the `UC_HOOK_INTR` callback without touching the guest's IDT (and that
`x86_cpu_do_interrupt` then delivers them, vmm/tcg/native_exceptions.py), that
HLT returns from `emu_start`. Another version may differ in any of these, so
importing this module with another version installed fails with one clear
line instead of a guest that misbehaves later.
"""

from __future__ import annotations

import ctypes
import functools
import re

from vmm.errors import PyvmmError

REQUIRED_VERSION = "2.1.4"
INSTALL_HINT = f"pip install unicorn=={REQUIRED_VERSION}"

try:
    import unicorn
    from unicorn import unicorn_const as uc_const
    from unicorn import x86_const as x86
    from unicorn.unicorn_py3.arch.intel import HOOK_INSN_IN_CFUNC, HOOK_INSN_OUT_CFUNC
    from unicorn.unicorn_py3.arch.types import uc_hook_h
    from unicorn.unicorn_py3.unicorn import (
        HOOK_INTR_CFUNC,
        MMIO_READ_CFUNC,
        MMIO_WRITE_CFUNC,
        uccallback,
        uclib,
    )
except ImportError as err:  # the package is missing, or a layout we do not know
    raise PyvmmError(
        f"the software CPU needs the Python package unicorn {REQUIRED_VERSION} ({INSTALL_HINT}): {err}"
    ) from None


def _library_version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    combined = uclib.uc_version(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}.{(combined >> 8) & 0xFF}"


if unicorn.__version__ != REQUIRED_VERSION or _library_version() != REQUIRED_VERSION:
    raise PyvmmError(
        f"the software CPU needs unicorn {REQUIRED_VERSION} exactly, found "
        f"{unicorn.__version__} (library {_library_version()}): {INSTALL_HINT}"
    )

Uc = unicorn.Uc
UcError = unicorn.UcError

# `uc_emu_stop` loads `uc->cpu` (mov rdi, [rdi + cpu]; test rdi, rdi) before
# calling cpu_exit: the field's offset is read from there, not from a header.
_LOAD_CPU = re.compile(rb"\x48\x8b\xbf(?P<cpu>.{4})\x48\x85\xff", re.DOTALL)
# Where the x86 CPU state (CPUX86State) sits in QEMU's X86CPU, after CPUState:
# `do_interrupt_x86_hardirq(env, ...)` starts with `sub rdi, 0x8a50` to get the
# CPU back from the state.
# `cpu_exit(cpu)` starts with `mov rax, [rdi + icount_decr_ptr]`, then stores -1 in the
# high half of the counter it points to (`mov [rax + 2], dx`): the word every translated
# block's first check reads to know whether to go back to the execution loop.
_CPU_EXIT = re.compile(rb"\x48\x8b\x87(?P<ptr>.{4})\xba\xff\xff\xff\xff.{0,24}?\x66\x89\x50\x02\xc3", re.DOTALL)
_ENV_FROM_CPU = re.compile(rb"\x41\x89\xd1\x48\x81\xef(?P<env>.{4})", re.DOTALL)


@functools.cache  # the library's code is the same for every engine
def uc_cpu_offset() -> int | None:
    """offsetof(struct uc_struct, cpu) in this library, None if its code is not as expected."""
    code = ctypes.string_at(ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value, 0x40)
    match = _LOAD_CPU.search(code)
    return int.from_bytes(match["cpu"], "little") if match else None


@functools.cache  # the library's code is the same for every engine
def cpu_icount_decr_ptr_offset() -> int | None:
    """offsetof(CPUState, icount_decr_ptr) in this library, None if its code is not as expected."""
    code = ctypes.string_at(ctypes.cast(uclib.cpu_exit, ctypes.c_void_p).value, 0x20)
    match = _CPU_EXIT.match(code)
    return int.from_bytes(match["ptr"], "little") if match else None


@functools.cache  # the library's code is the same for every engine
def cpu_env_offset() -> int | None:
    """offsetof(X86CPU, env) in this library, None if its code is not as expected."""
    code = ctypes.string_at(ctypes.cast(uclib.do_interrupt_x86_hardirq_x86_64, ctypes.c_void_p).value, 16)
    match = _ENV_FROM_CPU.match(code)
    return int.from_bytes(match["env"], "little") if match else None

__all__ = ["HOOK_INSN_IN_CFUNC", "HOOK_INSN_OUT_CFUNC", "HOOK_INTR_CFUNC", "MMIO_READ_CFUNC", "MMIO_WRITE_CFUNC", "Uc", "UcError", "uc_const", "uc_hook_h", "uccallback", "uclib", "uc_cpu_offset", "cpu_env_offset",
           "cpu_icount_decr_ptr_offset", "x86",
           "REQUIRED_VERSION"]
