"""The gdb stub on KVM: KVM_SET_GUEST_DEBUG and the registers gdb sees.

From Documentation/virt/kvm/api.rst: `KVM_SET_GUEST_DEBUG` takes a control
word (ENABLE, SINGLESTEP, USE_SW_BP to have every #BP exit to us, USE_HW_BP
to load DR0-DR3/DR7 from `debugreg[]`, BLOCKIRQ to keep interrupts out of a
single step, INJECT_BP/INJECT_DB to hand an exception back to the guest);
a stop comes back as `KVM_EXIT_DEBUG` with the exception (1 for #DB, 3 for
#BP), the linear PC and DR6/DR7. DR7 is encoded as in the SDM (vol. 3,
17.2.4): per slot n, bit 2n+1 enables it globally, bits 16+4n hold the
condition (0 execute, 1 write, 3 read or write) and 18+4n the length
(0 one byte, 1 two, 3 four, 2 eight). x86 has no read-only condition.
"""

from __future__ import annotations

from vmm.cpu_state import GPR_NAMES
from vmm.errors import PyvmmError
from vmm.exits import DebugTrap
from vmm.guest_debug import ACCESS, BREAK, WRITE, DebugSupport, GuestDebug
from vmm.kvm import quirks
from vmm.kvm import uapi as k
from vmm.kvm.uapi import ffi

DEBUG_REGISTER_SLOTS = 4
DR7_FIXED = 0x600  # GE and the reserved bit 10, as QEMU and the SDM's reset value have them
DR6_BS = 1 << 14  # single step
CONDITION = {BREAK: 0, WRITE: 1, ACCESS: 3}
LENGTH = {1: 0, 2: 1, 4: 3, 8: 2}
BP_VECTOR = 3  # #BP; the other exception KVM_EXIT_DEBUG reports is #DB (1)


def debug_support(system) -> DebugSupport | None:
    if not system.check_extension(k.KVM_CAP_SET_GUEST_DEBUG):
        return None
    refused = quirks.guest_debug_refusals()
    if refused:
        return DebugSupport(slots=DEBUG_REGISTER_SLOTS, watch_kinds=frozenset(), int3=False,
                            notice=refused)
    return DebugSupport(slots=DEBUG_REGISTER_SLOTS, watch_kinds=frozenset({WRITE, ACCESS}), int3=True)


def guest_debug_request(debug: GuestDebug, block_irq: bool) -> tuple[int, list[int]]:
    """KVM_SET_GUEST_DEBUG's control word and debugreg[8] for `debug`."""
    if not debug.active:
        return 0, [0] * 8
    control = k.KVM_GUESTDBG_ENABLE
    debugreg = [0] * 8
    if debug.step:
        control |= k.KVM_GUESTDBG_SINGLESTEP | (k.KVM_GUESTDBG_BLOCKIRQ if block_irq else 0)
    if debug.int3_at:
        control |= k.KVM_GUESTDBG_USE_SW_BP
    if debug.points:
        control |= k.KVM_GUESTDBG_USE_HW_BP
        dr7 = DR7_FIXED
        for slot, point in enumerate(debug.points[:DEBUG_REGISTER_SLOTS]):
            debugreg[slot] = point.address
            dr7 |= (2 << (2 * slot)) | (CONDITION[point.kind] << (16 + 4 * slot)) \
                | (LENGTH[point.length] << (18 + 4 * slot))
        debugreg[7] = dr7
    return control, debugreg


def trap_from_exit(run, debug: GuestDebug) -> DebugTrap | None:
    """What KVM_EXIT_DEBUG reports, or None when the exception is the guest's own."""
    exit = run.debug
    if exit.exception == BP_VECTOR:
        return DebugTrap("int3", exit.pc) if exit.pc in debug.int3_at else None
    if exit.dr6 & DR6_BS and debug.step:
        return DebugTrap("step", exit.pc)
    for slot, point in enumerate(debug.points[:DEBUG_REGISTER_SLOTS]):
        if exit.dr6 & (1 << slot):
            return DebugTrap(point.kind, point.address if point.kind != BREAK else exit.pc)
    return None


def reinjection(run) -> int:
    """The control bit that hands the guest back the #BP or #DB it raised itself."""
    return k.KVM_GUESTDBG_INJECT_BP if run.debug.exception == BP_VECTOR else k.KVM_GUESTDBG_INJECT_DB


# -- registers -------------------------------------------------------------------

_GENERAL = (*GPR_NAMES, "rip")
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")


def _full_tag_word(abridged: int) -> int:
    """FXSAVE's one-bit-per-register tag as the x87's two-bit tag (valid 00, empty 11)."""
    return sum((0 if abridged >> i & 1 else 3) << (2 * i) for i in range(8))


def read_debug_registers(fd) -> dict[str, int | None]:
    regs, sregs, fpu = fd.get_regs(), fd.get_sregs(), fd.get_fpu()
    values: dict[str, int | None] = {name: getattr(regs, name) for name in _GENERAL}
    values["eflags"] = regs.rflags
    for name in _SEGMENTS:
        values[name] = getattr(sregs, name).selector
    values["fs_base"], values["gs_base"] = sregs.fs.base, sregs.gs.base
    for name in _CONTROL:
        values[name] = getattr(sregs, name)
    for i in range(8):
        values[f"st{i}"] = int.from_bytes(bytes(ffi.buffer(fpu.fpr[i]))[:10], "little")
    values.update(fctrl=fpu.fcw, fstat=fpu.fsw, ftag=_full_tag_word(fpu.ftwx), fop=fpu.last_opcode,
                  fioff=fpu.last_ip & 0xFFFFFFFF, fooff=fpu.last_dp & 0xFFFFFFFF, fiseg=0, foseg=0,
                  mxcsr=fpu.mxcsr)
    for i in range(16):
        values[f"xmm{i}"] = int.from_bytes(bytes(ffi.buffer(fpu.xmm[i])), "little")
    return values


def write_debug_registers(fd, values: dict[str, int]) -> None:
    writable = set(_GENERAL) | {"eflags", "fs_base", "gs_base", *_CONTROL, "fctrl", "fstat", "mxcsr"} \
        | {f"xmm{i}" for i in range(16)} | {f"st{i}" for i in range(8)}
    refused = sorted(set(values) - writable)
    if refused:
        raise PyvmmError(f"KVM does not let the debugger write {', '.join(refused)}")
    regs = fd.get_regs()
    for name, value in values.items():
        if name in _GENERAL or name == "eflags":
            setattr(regs, "rflags" if name == "eflags" else name, value)
    fd.set_regs(regs)
    if values.keys() & {"fs_base", "gs_base", *_CONTROL}:
        sregs = fd.get_sregs()
        for name in ("fs_base", "gs_base"):
            if name in values:
                getattr(sregs, name[:2]).base = values[name]
        for name in _CONTROL:
            if name in values:
                setattr(sregs, name, values[name])
        fd.set_sregs(sregs)
    fpu_names = values.keys() & ({"fctrl", "fstat", "mxcsr"} | {f"xmm{i}" for i in range(16)}
                                 | {f"st{i}" for i in range(8)})
    if fpu_names:
        fpu = fd.get_fpu()
        for name in fpu_names:
            value = values[name]
            if name.startswith("xmm"):
                ffi.buffer(fpu.xmm[int(name[3:])])[:] = value.to_bytes(16, "little")
            elif name.startswith("st"):
                ffi.buffer(fpu.fpr[int(name[2:])])[:10] = value.to_bytes(10, "little")
            else:
                setattr(fpu, {"fctrl": "fcw", "fstat": "fsw", "mxcsr": "mxcsr"}[name], value)
        fd.set_fpu(fpu)

