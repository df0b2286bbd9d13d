"""What the gdb session needs from the thing it debugs, and what comes back from it.

vmm/gdb/debugger.py implements `Target` on a running VM; the protocol's unit
tests implement it on a dictionary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

ACTIONS = "cs"  # continue, step


class MemoryFault(Exception):
    """A guest-virtual address that does not translate, or no RAM behind it."""


class Refused(Exception):
    """What gdb asked cannot be done: a register the accelerator does not let us write, a
    breakpoint with every debug register in use. The message says which."""


@dataclass(frozen=True)
class StopEvent:
    thread: int
    # "interrupt" (gdb's Ctrl-C, or stopped on attach), "step", "swbreak", "hwbreak",
    # "watch", "rwatch", "awatch" (address = the data address), or "exited".
    reason: str
    address: int = 0
    exit_status: int | None = None  # the VM ended with this status


class Target(ABC):
    @abstractmethod
    def threads(self) -> list[int]:
        """Thread ids, from 1."""

    @abstractmethod
    def stop(self) -> StopEvent:
        """Stop every thread (if running) and return why they are stopped."""

    @abstractmethod
    def resume(self, actions: dict[int, str]) -> None:
        """Let each named thread continue ("c") or step one instruction ("s"); the rest stay stopped."""

    @abstractmethod
    def registers(self, thread: int) -> dict[str, int | None]:
        """Register values by the names in vmm/gdb/registers.py; None when not available."""

    @abstractmethod
    def write_registers(self, thread: int, values: dict[str, int]) -> None:
        """Raises Refused for a register that cannot be written."""

    @abstractmethod
    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        """Guest-virtual memory through the thread's page tables; may return fewer bytes than
        asked up to the first fault; raises MemoryFault when not even the first byte reads."""

    @abstractmethod
    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        """All or nothing; raises MemoryFault."""

    @abstractmethod
    def add_point(self, kind: str, address: int, length: int) -> bool:
        """False: this kind is never supported here; raises Refused when it is but cannot be set now."""

    @abstractmethod
    def remove_point(self, kind: str, address: int, length: int) -> None: ...
