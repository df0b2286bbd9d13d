"""The reasons a vCPU stops running guest code, as values the exit loop matches on.

Every accelerator turns its own stop reasons into these. Port and MMIO
accesses carry their data as bytes in guest (little-endian) order; for a
read, the loop answers with `Vcpu.complete_read(data)` before re-entering.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class IoOut:
    """`out`/`outs`: `count` items of `size` bytes each (count > 1 for `rep outs`)."""

    port: int
    size: int
    count: int
    data: bytes


@dataclass(slots=True)
class IoIn:
    """`in`/`ins`: the loop supplies `size * count` bytes."""

    port: int
    size: int
    count: int


@dataclass(slots=True)
class MmioWrite:
    address: int
    data: bytes


@dataclass(slots=True)
class MmioRead:
    """The loop supplies `size` bytes."""

    address: int
    size: int


@dataclass(slots=True)
class Hlt:
    """The guest halted and the accelerator has no interrupt source to wake it."""


@dataclass(slots=True)
class Shutdown:
    """The guest triple-faulted."""


@dataclass(slots=True)
class SystemEvent:
    """The guest asked the platform to power off or reset (for example through PSCI-like hypercalls)."""

    kind: str  # "shutdown", "reset" or "crash"


@dataclass(slots=True)
class Interrupted:
    """The vCPU was kicked out of the guest by another thread; nothing happened in the guest."""


@dataclass(slots=True)
class EntryFailure:
    """The accelerator refused to enter the guest: the vCPU state is invalid."""

    reason: int
    rip: int | None = None


SUBERROR_EMULATION = 1  # KVM_INTERNAL_ERROR_EMULATION: "could not emulate"


@dataclass(slots=True)
class EmulationFailure:
    """The accelerator could not execute a guest instruction."""

    suberror: int  # KVM's internal-error suberror; the software CPU reports SUBERROR_EMULATION
    rip: int | None = None
    instruction: bytes = b""
    detail: str = ""


@dataclass(slots=True)
class DebugTrap:
    """The vCPU stopped for the debugger (vmm/guest_debug.py): after a single step ("step"), at
    an instruction breakpoint ("break"), at an int3 the debugger placed ("int3"), or after an
    access to a watched address ("write", "read", "access"; `address` is the watched one)."""

    kind: str
    address: int = 0


@dataclass(slots=True)
class UnknownExit:
    reason: int


Exit = (
    IoOut | IoIn | MmioWrite | MmioRead | Hlt | Shutdown | SystemEvent | Interrupted
    | EntryFailure | EmulationFailure | DebugTrap | UnknownExit
)
