"""One Unicorn x86-64 engine and the fast paths the software CPU needs from it.

The Python binding's `reg_read` costs about 4 us (it builds ctypes objects
per call); calling the C library directly with preallocated buffers costs
about 1 us, and a batch of registers about the same as one. Interrupt
delivery reads and writes a dozen registers, so it goes through
`read_regs`/`write_regs` here. Everything that patches QEMU's hidden CPU
state goes through `context` (vmm/tcg/qemu_env.py).

The engine is always opened in 64-bit mode: the guest's own CR0/EFER and
segment caches decide whether it runs real, protected or long mode code.

Its CPU model decides which features Unicorn's TCG enforces, whatever CPUID
says (vmm/tcg/cpuid.py answers CPUID): a CR4 bit the model lacks does not
stick, so SMAP and protection keys (PKU) work only with a model that has
them. Skylake-Server is the oldest of Unicorn's models with both; against the
default (Haswell) it adds only SMAP, PKU, ADX, CLFLUSHOPT, CLWB and 1 GiB
pages, all emulated by this TCG (QEMU 5's TCG_*_FEATURES), and other family
and model numbers (which the guest is not shown). `--cpu-vendor amd` takes
EPYC-Rome instead, the newest AMD model (SMAP, no protection keys): the
vendor decides how the guest's CPUID reads and what SYSENTER does in long
mode (vmm/tcg/syscall.py).

Unicorn follows every guest load and store with a call to a helper that
checks whether emulation must stop (so that an access to unmapped memory
stops at once). The call makes TCG write every guest register back to memory
around each access and costs about 10% of a Linux boot. pyvmm maps all guest
physical memory it emulates and stops the guest only through the stop hook
(checked at every block start) or from its own hooks, where stopping at the
end of the block is fine (vmm/tcg/vm.py), so `_skip_exit_checks_after_accesses`
turns those per-access checks off through Unicorn's own switch for them
(`no_exit_request`, which its ARM translator uses for IT blocks).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import re
import time
from collections.abc import Callable

from vmm.cpu_state import MISC_ENABLE_FAST_STRINGS, MSR_MISC_ENABLE, RFLAGS_IF
from vmm.tcg.code_pages import patch_code_page_tracking
from vmm.tcg.native_interrupts import Injector
from vmm.tcg.native_syscall import patch_syscall
from vmm.tcg.qemu_env import OFF_XCR0, ContextBuffer, EnvLayoutError, check_layout
from vmm.tcg.stop_hook import StopHook, live_rflags_address
from vmm.tcg.unicorn_lib import (
    MMIO_READ_CFUNC,
    MMIO_WRITE_CFUNC,
    Uc,
    UcError,
    uc_const,
    uccallback,
    uclib,
    x86,
)

UC_CTL_TLB_FLUSH_WRITE = (uc_const.UC_CTL_IO_WRITE << 30) | uc_const.UC_CTL_TLB_FLUSH
PAGE_SIZE = 0x1000
CPU_MODELS = {"intel": x86.UC_CPU_X86_SKYLAKE_SERVER, "amd": x86.UC_CPU_X86_EPYC_ROME}  # by --cpu-vendor
CPUID_HLT = bytes.fromhex("0f a2 f4")  # cpuid; hlt
RDTSC_HLT = bytes.fromhex("0f 31 f4")  # rdtsc; hlt
XSETBV_HLT = bytes.fromhex("0f 01 d1 f4")  # xsetbv; hlt
CR4_OSXSAVE = 1 << 18
XCR0_X87 = 0x1
XCR0_PROBE = 0x3  # x87 | SSE
CPUID_OUTPUTS = (x86.UC_X86_REG_EAX, x86.UC_X86_REG_EBX, x86.UC_X86_REG_ECX, x86.UC_X86_REG_EDX)
# The guest is told the TSC's rate (CPUID 0x15) and never calibrates it, so an
# error here is a clock drift in the guest: 1000 ppm is 86 s a day. Each end
# of the window is the best of a few reads (the shortest bracket). The guest's
# RDTSC reads the host's counter (QEMU's helper executes RDTSC), so on an
# x86-64 host the counter is read by a three-instruction function in an
# executable page: about 0.15 us of bracket, and 10 ms keep the error within a
# few ppm. Elsewhere the engine runs RDTSC: about 2 us, and 50 ms keep it near
# 40 ppm. (The window is wall time every start-up with a local APIC waits.)
HOST_RDTSC = bytes.fromhex("0f 31 48 c1 e2 20 48 09 d0 c3")  # rdtsc; shl rdx, 32; or rax, rdx; ret
HOST_TSC_MEASURE_SECONDS = 0.01
TSC_MEASURE_SECONDS = 0.05
TSC_READS_PER_END = 5


class EngineError(RuntimeError):
    """A Unicorn call failed in a way that is a bug in pyvmm, not the guest's doing."""


class Engine:
    def __init__(self, *, measure_tsc: bool = True, vendor: str = "intel") -> None:
        """`measure_tsc`: measure the host TSC's rate (`tsc_hz`, else None), which takes
        TSC_MEASURE_SECONDS once per process; only a guest told the rate needs it.
        `vendor`: a key of CPU_MODELS."""
        # Before anything is translated, in any engine of this process.
        self.code_page_tracking_patched = patch_code_page_tracking()
        patch_syscall()
        self.uc = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
        self.uc.ctl_set_cpu_model(CPU_MODELS[vendor])
        self.vendor = vendor
        self.handle = self.uc._uch
        # With "exits" enabled and none registered, emu_start's `until` address is
        # ignored: the guest runs until a hook, HLT or an error stops it.
        self.uc.ctl_exits_enabled(True)
        self._no_exit_request = _skip_exit_checks_after_accesses(self.handle)
        self.per_access_exit_checks = self._no_exit_request is None
        self._one = ctypes.c_uint64()
        self._one_ref = ctypes.byref(self._one)
        self._batches: dict[tuple[int, ...], tuple] = {}
        self.context = self.new_context()
        self.context.save()
        check_layout(self.write_reg, self.write_msr, self.context, x86)
        self.native_cpuid, self.tsc_hz = self._probe(measure_tsc)
        # Unicorn's reset enables every XSAVE component; a CPU leaves reset with x87 only.
        self.context.env.set_u64(OFF_XCR0, XCR0_X87)
        self.context.restore()  # forget the probes' register values
        # Unicorn's reset clears IA32_MISC_ENABLE; firmware leaves fast strings on (vmm/tcg/cpuid.py
        # says what Linux does with them).
        self.write_msr(MSR_MISC_ENABLE, MISC_ENABLE_FAST_STRINGS)
        self.stop_hook = StopHook(self.uc, exit_check_per_block=not self.per_access_exit_checks)
        # Where RFLAGS.IF is read (`interrupts_enabled`): the engine's live word, as the stop hook
        # reads it; None where its address is not found.
        rflags = live_rflags_address(self.handle)
        self._live_rflags = ctypes.c_uint32.from_address(rflags) if rflags is not None else None
        self._mmio_callbacks: list[tuple] = []
        # Delivers external interrupts inside the engine; None: Python builds their frames.
        self.injector = Injector.for_engine(self.handle)

    def new_context(self) -> ContextBuffer:
        """A saved-state buffer for this engine (one per vCPU, freed by its owner)."""
        return ContextBuffer(uclib, self.handle)

    # -- registers -------------------------------------------------------------

    def reg(self, regid: int) -> int:
        self._one.value = 0  # segment selectors fill only the low 16 bits
        status = uclib.uc_reg_read(self.handle, regid, self._one_ref)
        if status:
            raise EngineError(f"uc_reg_read({regid}) failed with error {status}")
        return self._one.value

    def interrupts_enabled(self) -> bool:
        """RFLAGS.IF. QEMU keeps IF in the live RFLAGS word as the guest runs, also inside a
        hook, so it is read there; `uc_reg_read` would fold in the lazily computed arithmetic
        flags as well, which a device access raising an interrupt does not need."""
        if self._live_rflags is not None:
            return bool(self._live_rflags.value & RFLAGS_IF)
        return bool(self.reg(x86.UC_X86_REG_RFLAGS) & RFLAGS_IF)

    def write_reg(self, regid: int, value: int) -> None:
        self._one.value = value & 0xFFFFFFFFFFFFFFFF
        status = uclib.uc_reg_write(self.handle, regid, self._one_ref)
        if status:
            raise EngineError(f"uc_reg_write({regid}) failed with error {status}")

    def _batch(self, regids: tuple[int, ...]):
        batch = self._batches.get(regids)
        if batch is None:
            values = (ctypes.c_uint64 * len(regids))()
            ids = (ctypes.c_int * len(regids))(*regids)
            pointers = (ctypes.c_void_p * len(regids))(
                *(ctypes.addressof(values) + 8 * i for i in range(len(regids))))
            batch = self._batches[regids] = (ids, values, pointers)
        return batch

    def read_regs(self, regids: tuple[int, ...]) -> list[int]:
        ids, values, pointers = self._batch(regids)
        ctypes.memset(values, 0, ctypes.sizeof(values))
        status = uclib.uc_reg_read_batch(self.handle, ids, pointers, len(regids))
        if status:
            raise EngineError(f"uc_reg_read_batch failed with error {status}")
        return list(values)

    def write_regs(self, regids: tuple[int, ...], new_values) -> None:
        ids, values, pointers = self._batch(regids)
        for i, value in enumerate(new_values):
            values[i] = value & 0xFFFFFFFFFFFFFFFF
        status = uclib.uc_reg_write_batch(self.handle, ids, pointers, len(regids))
        if status:
            raise EngineError(f"uc_reg_write_batch failed with error {status}")

    def cr4(self) -> int:
        return self.reg(x86.UC_X86_REG_CR4)

    def xcr0(self) -> int:
        """XCR0, which Unicorn's register API does not expose."""
        return self.context.save().u64(OFF_XCR0)

    def read_msr(self, index: int) -> int:
        return self.uc.msr_read(index)

    def write_msr(self, index: int, value: int) -> None:
        self.uc.msr_write(index, value & 0xFFFFFFFFFFFFFFFF)

    def stop_precisely(self, enabled: bool) -> None:
        """While debugging: let a hook's `emu_stop` end emulation before the next instruction
        rather than at the end of the block (Unicorn's own default; see the module docstring).
        Takes effect for code translated from now on, so the translation cache is dropped."""
        if self._no_exit_request is not None:
            self._no_exit_request.value = not enabled
        self.uc.ctl_flush_tb()

    def flush_tlb(self) -> None:
        """Needed after CR3 or paging state changed behind QEMU's back (context restore)."""
        status = uclib.uc_ctl(self.handle, UC_CTL_TLB_FLUSH_WRITE)
        if status:
            raise EngineError(f"TLB flush failed with error {status}")

    # -- memory ----------------------------------------------------------------

    def map_ram(self, guest_address: int, size: int, host_address: int) -> None:
        self.uc.mem_map_ptr(guest_address, size, uc_const.UC_PROT_ALL, host_address)

    def map_mmio(self, guest_address: int, size: int, read, write) -> None:
        """MMIO at [guest_address, +size): the library calls `read(uc, offset, size, user_data)`
        and `write(uc, offset, size, value, user_data)` through the binding's exception guard
        alone (its `mmio_map` adds two more Python calls to every access)."""
        callbacks = (uccallback(self.uc, MMIO_READ_CFUNC)(read), uccallback(self.uc, MMIO_WRITE_CFUNC)(write))
        status = uclib.uc_mmio_map(self.handle, guest_address, size, callbacks[0], None, callbacks[1], None)
        if status != uc_const.UC_ERR_OK:
            raise UcError(status)
        self._mmio_callbacks.append(callbacks)  # the library holds only their addresses

    # -- probing the emulated CPU, before any hook or guest memory exists ---------

    _tsc_hz_cache: int | None = None

    def _probe(self, measure_tsc: bool) -> tuple[dict, int | None]:
        from vmm.tcg.cpuid import PROBED_LEAVES

        page = 0
        self.uc.mem_map(page, PAGE_SIZE)
        try:
            self.uc.mem_write(page, CPUID_HLT + RDTSC_HLT + XSETBV_HLT)
            native = {}
            for leaf, subleaf in PROBED_LEAVES:
                self.write_regs((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX), (leaf, subleaf))
                self.start(page)
                native[(leaf, subleaf)] = tuple(self.read_regs(CPUID_OUTPUTS))
            self._check_xcr0_offset(page + len(CPUID_HLT + RDTSC_HLT))
            if Engine._tsc_hz_cache is None and measure_tsc:
                Engine._tsc_hz_cache = self._measure_tsc_hz(page + len(CPUID_HLT))
            return native, Engine._tsc_hz_cache
        finally:
            self.uc.mem_unmap(page, PAGE_SIZE)

    def _check_xcr0_offset(self, code: int) -> None:
        """XCR0 is read from the saved CPU state (`xcr0`): a value set by XSETBV must be there."""
        self.write_reg(x86.UC_X86_REG_CR4, self.cr4() | CR4_OSXSAVE)
        self.write_regs((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX), (XCR0_PROBE, 0, 0))
        self.start(code)
        probe = self.new_context()  # not self.context, which holds the state to return to
        try:
            if probe.save().u64(OFF_XCR0) != XCR0_PROBE:
                raise EnvLayoutError(f"QEMU CPU state offset {OFF_XCR0} does not hold XCR0")
        finally:
            probe.free()

    def _engine_rdtsc(self, code: int) -> int:
        """The TSC as the guest reads it: RDTSC run by the engine at `code`."""
        self.start(code)
        low, high = self.read_regs((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RDX))
        return (high << 32) | (low & 0xFFFFFFFF)

    def _measure_tsc_hz(self, code: int) -> int:
        """RDTSC runs natively (the host's TSC): measure its rate once per process."""
        rdtsc = host_rdtsc()
        if rdtsc is not None:
            return _tsc_hz(rdtsc, HOST_TSC_MEASURE_SECONDS)
        self._engine_rdtsc(code)  # translate the block first
        return _tsc_hz(lambda: self._engine_rdtsc(code), TSC_MEASURE_SECONDS)

    # -- running ---------------------------------------------------------------

    def start(self, rip: int) -> None:
        """Run from `rip` until HLT, a stop request or an error (raised as UcError)."""
        self.uc.emu_start(rip, 0)

    def close(self) -> None:
        self.stop_hook.close()
        if self.injector is not None:
            self.injector.close()
        self.context.free()


@functools.cache
def host_rdtsc() -> Callable[[], int] | None:
    """The host's RDTSC as a function (its page stays mapped for the process), None where
    it cannot be called directly: not x86-64, or executable mappings refused."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return None
    page.write(HOST_RDTSC)
    function = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    function.page = page  # keeps the mapping alive with the function
    return function


def _tsc_hz(rdtsc: Callable[[], int], seconds: float) -> int:
    """The rate of `rdtsc`'s counter over `seconds`, to 1 kHz (what CPUID can say)."""

    def read() -> tuple[int, int, int]:  # (host monotonic ns, TSC, bracket ns)
        before = time.perf_counter_ns()
        tsc = rdtsc()
        after = time.perf_counter_ns()
        return (before + after) // 2, tsc, after - before

    def best() -> tuple[int, int, int]:
        return min((read() for _ in range(TSC_READS_PER_END)), key=lambda sample: sample[2])

    t0, tsc0, _ = best()
    time.sleep(seconds)
    t1, tsc1, _ = best()
    return int(round((tsc1 - tsc0) * 1e9 / (t1 - t0), -3))


# `check_exit_request(tcg_ctx)` in Unicorn's tcg-op.c starts with
#     mov  rsi, [rdi + offsetof(TCGContext, uc)]
#     cmp  byte [rsi + offsetof(uc_struct, no_exit_request)], 0
# so the field's offset is read from the library's own code rather than
# assumed from a header.
_CHECK_PROLOGUE = re.compile(rb"\x48\x8b\xb7(?P<uc>.{4})\x80\xbe(?P<flag>.{4})\x00", re.DOTALL)


def _skip_exit_checks_after_accesses(handle) -> ctypes.c_bool | None:
    """Set uc->no_exit_request before anything is translated and return it; None if the code
    is not as expected."""
    function = getattr(uclib, "check_exit_request_x86_64", None)
    address = ctypes.cast(function, ctypes.c_void_p).value if function is not None else None
    if not address:
        return None
    match = _CHECK_PROLOGUE.match(ctypes.string_at(address, 14))
    if match is None:
        return None
    offset = int.from_bytes(match["flag"], "little")
    flag = ctypes.c_bool.from_address(ctypes.cast(handle, ctypes.c_void_p).value + offset)
    flag.value = True
    return flag


__all__ = ["Engine", "EngineError", "UcError", "x86"]
