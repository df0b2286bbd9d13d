"""The gdb stub on the software CPU: breakpoints, watchpoints and single-step as engine hooks.

Every hook here exists only while the debugger uses it, so a guest that is
not being debugged runs exactly as before (no hook, no per-instruction call):

- an instruction breakpoint is a `UC_HOOK_CODE` bounded to its one address
  (Unicorn instruments only the instructions inside a hook's range);
- single-step is an unbounded `UC_HOOK_CODE`: the first instruction of the
  stepping vCPU runs, the next one stops it;
- a watchpoint is a `UC_HOOK_MEM_WRITE`/`UC_HOOK_MEM_READ` on its range. Stopping
  inside an access would leave a half-executed instruction (a push that wrote
  but did not move RSP), so a hit is only noted, and the same unbounded
  `UC_HOOK_CODE` as single-step (present while any watchpoint is) stops the
  vCPU before its next instruction: gdb sees the new value with RIP just past
  the instruction that made the access, as on hardware.

Hooks are engine-wide (all vCPUs share one engine); each callback looks at
the vCPU running now. While any of them exist the engine stops precisely
(`Engine.stop_precisely`), and every change drops the translation cache so
that code already translated picks the hooks up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from vmm.cpu_state import GPR_NAMES
from vmm.errors import PyvmmError
from vmm.exits import DebugTrap
from vmm.guest_debug import ACCESS, BREAK, READ, WRITE, DebugPoint, DebugSupport, GuestDebug
from vmm.tcg.engine import Engine, x86
from vmm.tcg.qemu_env import OFF_EFER
from vmm.tcg.unicorn_lib import uc_const

if TYPE_CHECKING:
    from vmm.tcg.scheduler import CpuScheduler


class SteppedVcpu(Protocol):
    """What these hooks use of a software-CPU vCPU (vmm/tcg/vcpu.py, which imports this file)."""

    index: int
    debug_step: bool
    step_done: bool
    breakpoint_to_skip: int | None

    def registers(self) -> dict[str, int]: ...

    def stop_with(self, exit: DebugTrap) -> None: ...

SUPPORT = DebugSupport(slots=None, watch_kinds=frozenset({WRITE, READ, ACCESS}), int3=False)


class TcgDebugHooks:
    def __init__(self, engine: Engine, scheduler: CpuScheduler) -> None:
        self.engine = engine
        self.scheduler = scheduler  # its owner is the vCPU running now
        self._points: tuple[DebugPoint, ...] = ()
        self._point_hooks: list[int] = []
        self._stepping: set[int] = set()
        self._watching = False  # any watchpoint among the points
        self._watch_hits: dict[int, DebugTrap] = {}  # vCPU index -> the hit to report before its next instruction
        self._instruction_hook: int | None = None

    def apply(self, vcpu: SteppedVcpu, debug: GuestDebug) -> None:
        """Called on `vcpu`'s thread while every vCPU is stopped."""
        vcpu.debug_step = debug.step
        vcpu.step_done = False
        vcpu.breakpoint_to_skip = vcpu.registers()["rip"] if debug.points else None
        changed = False
        if debug.points != self._points:
            self._set_points(debug.points)
            changed = True
        self._stepping = self._stepping | {vcpu.index} if debug.step else self._stepping - {vcpu.index}
        wanted = bool(self._stepping) or self._watching
        if wanted != (self._instruction_hook is not None):
            if wanted:
                self._instruction_hook = self.engine.uc.hook_add(uc_const.UC_HOOK_CODE, self._on_instruction,
                                                                 None, 1, 0)
            else:
                self.engine.uc.hook_del(self._instruction_hook)
                self._instruction_hook = None
            changed = True
        if changed:
            self.engine.stop_precisely(bool(self._points or self._stepping))

    def _set_points(self, points: tuple[DebugPoint, ...]) -> None:
        uc = self.engine.uc
        for hook in self._point_hooks:
            uc.hook_del(hook)
        self._point_hooks = []
        for point in points:
            last = point.address + point.length - 1
            if point.kind == BREAK:
                self._point_hooks.append(uc.hook_add(uc_const.UC_HOOK_CODE, self._on_breakpoint, None,
                                                     point.address, point.address))
            if point.kind in (WRITE, ACCESS):
                self._point_hooks.append(uc.hook_add(uc_const.UC_HOOK_MEM_WRITE, self._on_access, point,
                                                     point.address, last))
            if point.kind in (READ, ACCESS):
                self._point_hooks.append(uc.hook_add(uc_const.UC_HOOK_MEM_READ, self._on_access, point,
                                                     point.address, last))
        self._points = points
        self._watching = any(point.kind != BREAK for point in points)
        if not self._watching:
            self._watch_hits.clear()

    # -- the hooks, on the running vCPU's thread --------------------------------------------

    def _on_breakpoint(self, uc, address: int, size: int, user_data) -> None:
        vcpu = self.scheduler.owner
        if vcpu.breakpoint_to_skip == address:
            vcpu.breakpoint_to_skip = None  # resuming from a breakpoint runs its instruction
            return
        vcpu.stop_with(DebugTrap(BREAK, address))

    def _on_instruction(self, uc, address: int, size: int, user_data) -> None:
        vcpu = self.scheduler.owner
        hit = self._watch_hits.pop(vcpu.index, None)
        if hit is not None:
            vcpu.stop_with(hit)
            return
        if not vcpu.debug_step:
            return
        vcpu.breakpoint_to_skip = None
        if vcpu.step_done:
            vcpu.stop_with(DebugTrap("step", address))
        else:
            vcpu.step_done = True

    def _on_access(self, uc, access: int, address: int, size: int, value: int, point: DebugPoint) -> None:
        # Before this vCPU's next instruction, not inside the access: see the module docstring.
        self._watch_hits.setdefault(self.scheduler.owner.index, DebugTrap(point.kind, point.address))


# -- registers, by the names of vmm/gdb/registers.py ----------------------------------------

_GENERAL = (*GPR_NAMES, "rip")
_IDS = {name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in _GENERAL}
_IDS.update(eflags=x86.UC_X86_REG_EFLAGS, cs=x86.UC_X86_REG_CS, ss=x86.UC_X86_REG_SS, ds=x86.UC_X86_REG_DS,
            es=x86.UC_X86_REG_ES, fs=x86.UC_X86_REG_FS, gs=x86.UC_X86_REG_GS, fs_base=x86.UC_X86_REG_FS_BASE,
            gs_base=x86.UC_X86_REG_GS_BASE, cr0=x86.UC_X86_REG_CR0, cr2=x86.UC_X86_REG_CR2,
            cr3=x86.UC_X86_REG_CR3, cr4=x86.UC_X86_REG_CR4, cr8=x86.UC_X86_REG_CR8,
            fctrl=x86.UC_X86_REG_FPCW, fstat=x86.UC_X86_REG_FPSW, ftag=x86.UC_X86_REG_FPTAG,
            mxcsr=x86.UC_X86_REG_MXCSR)
# 128 bits wide: read one by one, never into the batch's 64-bit slots.
_XMM_IDS = {f"xmm{i}": getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16)}
_FP_IDS = {f"st{i}": getattr(x86, f"UC_X86_REG_FP{i}") for i in range(8)}
# Written through the API; the segment selectors are not (a selector alone, without
# its descriptor, is not a state the CPU can be in).
_WRITABLE = frozenset(_GENERAL) | {"eflags", "fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8",
                                   "fctrl", "fstat", "mxcsr"} | {f"xmm{i}" for i in range(16)}


def read_debug_registers(engine: Engine) -> dict[str, int | None]:
    names = tuple(_IDS)
    values: dict[str, int | None] = dict(zip(names, engine.read_regs(tuple(_IDS.values())), strict=True))
    for name, regid in _XMM_IDS.items():
        values[name] = engine.uc.reg_read(regid)
    for name, regid in _FP_IDS.items():
        mantissa, exponent = engine.uc.reg_read(regid)
        values[name] = (exponent << 64) | mantissa
    values["efer"] = engine.context.save().u64(OFF_EFER)
    return values


def write_debug_registers(engine: Engine, values: dict[str, int]) -> None:
    refused = sorted(set(values) - _WRITABLE)
    if refused:
        raise PyvmmError(f"the software CPU does not let the debugger write {', '.join(refused)}")
    for name, value in values.items():
        if name in _XMM_IDS:
            engine.uc.reg_write(_XMM_IDS[name], value)
        else:
            engine.write_reg(_IDS[name], value)
