"""The reasons a vCPU stops running guest code, as values the exit loop matches on.

Every accelerator turns its own stop reasons into these. Port and MMIO
accesses carry their data as bytes in guest (little-endian) order; for a
read, the loop answers with `Vcpu.complete_read(data)` before re-entering.

Each is a NamedTuple, a record cheaper to define at start-up than a
dataclass (issue #18). Tell them apart by type (`type(exit) is IoOut`, or
`match`), never by truth or `==` alone: the exits without fields are empty,
so false, and two exits of different types with equal fields compare equal.
"""

from __future__ import annotations

from typing import NamedTuple


class IoOut(NamedTuple):
    """`out`/`outs`: `count` items of `size` bytes each (count > 1 for `rep outs`)."""

    port: int
    size: int
    count: int
    data: bytes


class IoIn(NamedTuple):
    """`in`/`ins`: the loop supplies `size * count` bytes."""

    port: int
    size: int
    count: int


class MmioWrite(NamedTuple):
    address: int
    data: bytes


class MmioRead(NamedTuple):
    """The loop supplies `size` bytes."""

    address: int
    size: int


class Hlt(NamedTuple):
    """The guest halted and the accelerator has no interrupt source to wake it."""


class Shutdown(NamedTuple):
    """The guest triple-faulted."""


class SystemEvent(NamedTuple):
    """The guest asked the platform to power off or reset (for example through PSCI-like hypercalls)."""

    kind: str  # "shutdown", "reset" or "crash"


class Interrupted(NamedTuple):
    """The vCPU was kicked out of the guest by another thread; nothing happened in the guest."""


class EntryFailure(NamedTuple):
    """The accelerator refused to enter the guest: the vCPU state is invalid."""

    reason: int
    rip: int | None = None


SUBERROR_EMULATION = 1  # KVM_INTERNAL_ERROR_EMULATION: "could not emulate"


class EmulationFailure(NamedTuple):
    """The accelerator could not execute a guest instruction."""

    suberror: int  # KVM's internal-error suberror; the software CPU reports SUBERROR_EMULATION
    rip: int | None = None
    instruction: bytes = b""
    detail: str = ""


class DebugTrap(NamedTuple):
    """The vCPU stopped for the debugger (vmm/guest_debug.py): after a single step ("step"), at
    an instruction breakpoint ("break"), at an int3 the debugger placed ("int3"), or after an
    access to a watched address ("write", "read", "access"; `address` is the watched one)."""

    kind: str
    address: int = 0


class UnknownExit(NamedTuple):
    reason: int


Exit = (
    IoOut | IoIn | MmioWrite | MmioRead | Hlt | Shutdown | SystemEvent | Interrupted
    | EntryFailure | EmulationFailure | DebugTrap | UnknownExit
)
