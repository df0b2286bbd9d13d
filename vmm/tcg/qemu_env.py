"""QEMU's x86 CPU state (`CPUX86State`) inside a Unicorn context, read and patched in place.

Unicorn's register API cannot do everything a VMM needs: writing CS or SS in
64-bit mode sets only the selector, not the hidden descriptor cache or the
CPL; the error code of the last exception and QEMU's "exception in flight"
marker (`old_exception`, which turns the next #PF into a #DF unless it is
cleared) are not exposed at all. `uc_context_save` copies the raw
`CPUX86State` (up to `end_reset_fields`) into a buffer and
`uc_context_restore` copies it back, so the VMM can patch those fields
between the two. The offsets below are those of Unicorn 2.1.4 (x86-64
target); `EnvLayoutError` is raised by `check_layout` when a probe shows they
do not match, instead of corrupting the guest.

Segment loads mirror QEMU's `cpu_x86_load_seg_cache`, which keeps the
translation flags (`hflags`: CPL, 16/32/64-bit code and stack) in step with
the descriptor caches.
"""

from __future__ import annotations

import ctypes
import struct

from vmm.cpu_state import (
    CR0_PE,
    CR0_PG,
    CR4_OSFXSR,
    EFER_LMA,
    EFER_LME,
    MSR_CSTAR,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_STAR,
    MSR_SYSCALL_MASK,
    RFLAGS_VM,
)

# Offsets in CPUX86State (Unicorn 2.1.4, TARGET_X86_64).
OFF_REGS = 0  # target_ulong regs[16]
OFF_EIP = 128
OFF_EFLAGS = 136
OFF_HFLAGS = 176
OFF_HFLAGS2 = 180
OFF_SEGS = 184  # SegmentCache segs[6], then ldt, tr, gdt, idt
OFF_LDT = OFF_SEGS + 6 * 24
OFF_TR = OFF_LDT + 24
OFF_GDT = OFF_TR + 24
OFF_IDT = OFF_GDT + 24
OFF_CR = 424  # target_ulong cr[9]
OFF_EFER = 592
OFF_STAR = 4824
OFF_LSTAR = 4840
OFF_CSTAR = 4848
OFF_FMASK = 4856
OFF_KERNEL_GS_BASE = 4864
OFF_XCR0 = 4904
OFF_ERROR_CODE = 5384  # int error_code of the exception being raised
OFF_EXCEPTION_IS_INT = 5388  # 1 for int n / int3 / into
OFF_DR = 5400
OFF_OLD_EXCEPTION = 5496  # the "exception in flight", -1 when none
ENV_SIZE = 5568  # offsetof(CPUX86State, end_reset_fields): what a context holds

SEGMENT_CACHE_SIZE = 24  # u32 selector, pad, u64 base, u32 limit, u32 flags

# QEMU's segment register indices.
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)

# Descriptor-cache flag bits: bits 8..23 of a descriptor's high dword, in place.
DESC_TYPE_SHIFT = 8
DESC_S = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_AVL = 1 << 20
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23

# Translation flags (QEMU's HF_*).
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_MP_SHIFT = 9  # MP, EM, TS follow in this order
HF_MP_EM_TS = 7 << HF_MP_SHIFT
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_OSFXSR = 1 << 22
HF2_GIF = 1 << 0
HF2_NMI_MASK = 1 << 2  # serving an NMI: no other NMI until IRET (which clears it)

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_SEGMENT = struct.Struct("<IxxxxQII")


class EnvLayoutError(RuntimeError):
    """The installed Unicorn does not lay out QEMU's CPU state the way this module expects."""


def descriptor_flags(type_: int, s: bool, dpl: int, present: bool, avl: bool, l: bool,  # noqa: E741
                     db: bool, g: bool) -> int:
    """Pack descriptor attributes the way QEMU's segment cache stores them."""
    return ((type_ & 15) << DESC_TYPE_SHIFT | DESC_S * s | (dpl & 3) << DESC_DPL_SHIFT
            | DESC_P * present | DESC_AVL * avl | DESC_L * l | DESC_B * db | DESC_G * g)


class EnvView:
    """Typed access to a `CPUX86State` image held in a writable buffer (a saved context)."""

    def __init__(self, buffer: memoryview, base: int) -> None:
        self.buf = buffer
        self.base = base

    # -- plain fields -----------------------------------------------------------

    def u32(self, offset: int) -> int:
        return _U32.unpack_from(self.buf, self.base + offset)[0]

    def set_u32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.buf, self.base + offset, value & 0xFFFFFFFF)

    def i32(self, offset: int) -> int:
        return _I32.unpack_from(self.buf, self.base + offset)[0]

    def set_i32(self, offset: int, value: int) -> None:
        _I32.pack_into(self.buf, self.base + offset, value)

    def u64(self, offset: int) -> int:
        return _U64.unpack_from(self.buf, self.base + offset)[0]

    def set_u64(self, offset: int, value: int) -> None:
        _U64.pack_into(self.buf, self.base + offset, value & 0xFFFFFFFFFFFFFFFF)

    @property
    def hflags(self) -> int:
        return self.u32(OFF_HFLAGS)

    @hflags.setter
    def hflags(self, value: int) -> None:
        self.set_u32(OFF_HFLAGS, value)

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL_MASK

    def cr(self, n: int) -> int:
        return self.u64(OFF_CR + 8 * n)

    def set_cr(self, n: int, value: int) -> None:
        self.set_u64(OFF_CR + 8 * n, value)

    @property
    def error_code(self) -> int:
        return self.i32(OFF_ERROR_CODE) & 0xFFFFFFFF

    @property
    def exception_is_int(self) -> bool:
        return self.i32(OFF_EXCEPTION_IS_INT) != 0

    def clear_exception_in_flight(self) -> None:
        """What QEMU does after it delivered an exception; without it the next #PF becomes #DF."""
        self.set_i32(OFF_OLD_EXCEPTION, -1)

    # -- segment and table registers -----------------------------------------

    def segment(self, index: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of segment register `index` (R_ES..R_GS)."""
        return _SEGMENT.unpack_from(self.buf, self.base + OFF_SEGS + SEGMENT_CACHE_SIZE * index)

    def _set_cache(self, offset: int, selector: int, base: int, limit: int, flags: int) -> None:
        _SEGMENT.pack_into(self.buf, self.base + offset, selector & 0xFFFF,
                           base & 0xFFFFFFFFFFFFFFFF, limit & 0xFFFFFFFF, flags & 0xFFFFFFFF)

    def table(self, offset: int) -> tuple[int, int, int, int]:
        return _SEGMENT.unpack_from(self.buf, self.base + offset)

    def set_table(self, offset: int, selector: int, base: int, limit: int, flags: int = 0) -> None:
        """GDTR/IDTR (selector and flags unused), LDTR or TR."""
        self._set_cache(offset, selector, base, limit, flags)

    def load_segment(self, index: int, selector: int, base: int, limit: int, flags: int) -> None:
        """Load a segment's hidden cache and update hflags, as QEMU's cpu_x86_load_seg_cache does."""
        self._set_cache(OFF_SEGS + SEGMENT_CACHE_SIZE * index, selector, base, limit, flags)
        hflags = self.hflags
        if index == R_CS:
            if hflags & HF_LMA and flags & DESC_L:
                hflags |= HF_CS32 | HF_SS32 | HF_CS64
            else:
                hflags &= ~(HF_CS32 | HF_CS64)
                if flags & DESC_B:
                    hflags |= HF_CS32
        if index == R_SS:
            hflags = (hflags & ~HF_CPL_MASK) | (flags >> DESC_DPL_SHIFT) & 3
        derived = HF_SS32 if self.segment(R_SS)[3] & DESC_B else 0
        if hflags & HF_CS64:
            pass  # long mode assumes zero bases for DS, ES and SS
        elif (not self.cr(0) & CR0_PE or self.u64(OFF_EFLAGS) & RFLAGS_VM
              or not hflags & HF_CS32):
            derived |= HF_ADDSEG
        elif self.segment(R_DS)[1] | self.segment(R_ES)[1] | self.segment(R_SS)[1]:
            derived |= HF_ADDSEG
        self.hflags = (hflags & ~(HF_SS32 | HF_ADDSEG)) | derived

    def set_control_registers(self, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        """Set CR0/CR3/CR4/EFER and the hflags derived from them (the caller flushes the TLB)."""
        if efer & EFER_LME and cr0 & CR0_PG:
            efer |= EFER_LMA
        self.set_cr(0, cr0)
        self.set_cr(3, cr3)
        self.set_cr(4, cr4)
        self.set_u64(OFF_EFER, efer)
        hflags = self.hflags & ~(HF_PE | HF_MP_EM_TS | HF_LMA | HF_OSFXSR | HF_CS64)
        if cr0 & CR0_PE:
            hflags |= HF_PE
        hflags |= (cr0 << (HF_MP_SHIFT - 1)) & HF_MP_EM_TS
        if efer & EFER_LMA:
            hflags |= HF_LMA
        if cr4 & CR4_OSFXSR:
            hflags |= HF_OSFXSR
        self.hflags = hflags
        self.set_u32(OFF_HFLAGS2, self.u32(OFF_HFLAGS2) | HF2_GIF)


class ContextBuffer:
    """One `uc_context` allocated for an engine, with an `EnvView` over its CPU state."""

    def __init__(self, uclib, handle) -> None:
        self._uclib = uclib
        self._handle = handle
        size = uclib.uc_context_size(handle)
        self.pointer = ctypes.c_void_p()
        status = uclib.uc_context_alloc(handle, ctypes.byref(self.pointer))
        if status != 0:
            raise MemoryError("uc_context_alloc failed")
        raw = (ctypes.c_char * size).from_address(self.pointer.value)
        # The context's header comes first; QEMU's CPU state fills the rest.
        self.env = EnvView(memoryview(raw).cast("B"), size - ENV_SIZE)

    def save(self) -> EnvView:
        if self._uclib.uc_context_save(self._handle, self.pointer) != 0:
            raise RuntimeError("uc_context_save failed")
        return self.env

    def restore(self) -> None:
        if self._uclib.uc_context_restore(self._handle, self.pointer) != 0:
            raise RuntimeError("uc_context_restore failed")

    def copy_from(self, other: ContextBuffer) -> None:
        """Make this context a copy of `other` (same engine)."""
        ctypes.memmove(self.pointer, other.pointer, self._uclib.uc_context_size(self._handle))

    def free(self) -> None:
        if self.pointer:
            self.env = None
            self._uclib.uc_context_free(self.pointer)
            self.pointer = ctypes.c_void_p()


def check_layout(write_reg, write_msr, context: ContextBuffer, regs) -> None:
    """Probe a fresh engine: values written through the API must appear at our offsets."""
    probes = [
        (lambda: write_reg(regs.UC_X86_REG_RAX, 0x1122334455667788), OFF_REGS, 0x1122334455667788),
        (lambda: write_reg(regs.UC_X86_REG_RBX, 0x0123456789ABCDEF), OFF_REGS + 3 * 8, 0x0123456789ABCDEF),
        (lambda: write_reg(regs.UC_X86_REG_DR0, 0xD0D0D0D012345678), OFF_DR, 0xD0D0D0D012345678),
        (lambda: write_msr(MSR_STAR, 0x0023001000000000), OFF_STAR, 0x0023001000000000),
        (lambda: write_msr(MSR_LSTAR, 0xFFFFFFFF81000000), OFF_LSTAR, 0xFFFFFFFF81000000),
        (lambda: write_msr(MSR_CSTAR, 0xFFFFFFFF82000000), OFF_CSTAR, 0xFFFFFFFF82000000),
        (lambda: write_msr(MSR_SYSCALL_MASK, 0x47700), OFF_FMASK, 0x47700),
        (lambda: write_msr(MSR_KERNEL_GS_BASE, 0xFFFF888000001000), OFF_KERNEL_GS_BASE, 0xFFFF888000001000),
        (lambda: write_reg(regs.UC_X86_REG_CR3, 0x5000), OFF_CR + 3 * 8, 0x5000),
    ]
    for write, _, _ in probes:
        write()
    env = context.save()
    for _, offset, expected in probes:
        if env.u64(offset) != expected:
            raise EnvLayoutError(f"QEMU CPU state offset {offset} holds {env.u64(offset):#x}, "
                                 f"expected {expected:#x}")
    for _, offset, _ in probes:
        env.set_u64(offset, 0)
    context.restore()
