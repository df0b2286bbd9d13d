"""The accelerator interface: what the machine builder and the exit loop use.

Two implementations sit behind it: `vmm.kvm` (hardware virtualisation through
/dev/kvm) and `vmm.tcg` (a software CPU). Nothing outside those packages may
depend on either; the machine, the exit loop and the devices see only these
classes.

Ownership follows creation: an `Accelerator` creates `VirtualMachine`s, a
`VirtualMachine` creates `Vcpu`s, and each closes what it created.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from vmm.bus import Bus, IrqLine
from vmm.cpu_features import FeatureEdit
from vmm.cpu_state import CpuState
from vmm.errors import PyvmmError
from vmm.exits import Exit
from vmm.memory import GuestMemory

if TYPE_CHECKING:  # only the gdb stub's requests use them (vmm/gdb/)
    from vmm.guest_debug import DebugSupport, GuestDebug


class MachineIo(NamedTuple):
    """The buses a VM's vCPUs dispatch to."""

    pio: Bus
    mmio: Bus


class PlatformOptions(NamedTuple):
    """What the machine builder asks of the accelerator's platform."""

    cpus: int = 1
    # In-kernel (or emulated) 8259 pair, I/O APIC, local APICs and 8254 PIT.
    # Without them HLT stops the vCPU with an `Hlt` exit and no device can
    # interrupt the guest: enough for the simplest flat guests.
    irqchip: bool = False
    # The user's CPUID edits (--cpu-features).
    cpu_features: Sequence[FeatureEdit] = ()
    # The software CPU's vendor (--cpu-vendor), one of CPU_VENDORS; None: its default.
    cpu_vendor: str | None = None



class Vcpu(ABC):
    index: int

    @abstractmethod
    def set_state(self, state: CpuState) -> None:
        """Load registers before the vCPU first runs."""

    @abstractmethod
    def run(self) -> Exit:
        """Run guest code until something needs the VMM; return why it stopped.

        Blocks the calling thread (without holding the GIL). After an `IoIn`
        or `MmioRead` exit the caller must supply the data with
        `complete_read` before calling `run` again.
        """

    @abstractmethod
    def complete_read(self, data: bytes) -> None:
        """Answer the port or MMIO read the vCPU stopped on."""

    @abstractmethod
    def kick(self) -> None:
        """From any thread: make the current or next `run` return `Interrupted` promptly."""

    def pause(self) -> None:
        """From any thread: make `run` return `Interrupted` soon, at a point where the guest
        loses nothing (a kick may drop the accesses the guest makes until it takes effect)."""
        self.kick()

    def thread_done(self) -> None:  # noqa: B027 - optional: only KVM's kick signals a thread
        """The thread that called `run` is about to end: nothing may signal it any more."""

    def dispatched_io_counts(self) -> Mapping[str, int]:
        """Accesses the accelerator handed to the buses itself rather than as exits
        (the software CPU dispatches from inside emulation), by exit name, for --stats."""
        return {}

    @abstractmethod
    def registers(self) -> dict[str, int]:
        """General registers, rip, rflags, cr0/cr3/cr4 and efer, for diagnostics."""

    # For the gdb stub (vmm/gdb/): called on the vCPU's own thread, between runs.

    def set_guest_debug(self, debug: GuestDebug) -> None:
        """Single-step and the breakpoints and watchpoints to report as `DebugTrap` exits."""
        raise PyvmmError("this accelerator cannot be debugged")

    def debug_registers(self) -> dict[str, int | None]:
        """Every register named in vmm/gdb/registers.py the accelerator can give."""
        raise PyvmmError("this accelerator cannot be debugged")

    def write_debug_registers(self, values: dict[str, int]) -> None:
        """Change registers by those names; raises PyvmmError naming one that cannot be written."""
        raise PyvmmError("this accelerator cannot be debugged")

    @abstractmethod
    def code_at_rip(self) -> tuple[int, bytes]:
        """From the thread that calls `run`, between runs: the linear address of the next
        instruction (CS base + RIP) and up to 15 bytes of code there (b"" if unreadable, or
        if the vCPU runs no code: not started yet, or halted)."""

    @abstractmethod
    def close(self) -> None: ...


class VirtualMachine(ABC):
    memory: GuestMemory

    @abstractmethod
    def create_vcpu(self, index: int) -> Vcpu: ...

    @abstractmethod
    def irq_line(self, gsi: int) -> IrqLine:
        """An interrupt input of the platform's interrupt controllers (ISA IRQ n is GSI n)."""

    # Optional fast paths for devices served by an I/O thread (virtio). An
    # accelerator without them returns None and the device falls back to
    # MMIO exits on the vCPU thread and to `irq_line`.

    def notifier(self, address: int, size: int, datamatch: int) -> int | None:
        """An eventfd signalled, instead of an MMIO exit, when the guest writes the `size`-byte
        value `datamatch` to MMIO `address`; owned by the VM. None if unsupported."""
        return None

    def irq_eventfd(self, gsi: int) -> int | None:
        """An eventfd, owned by the VM, whose every write is an edge on edge-triggered `gsi`
        (raised and lowered inside the accelerator, no exit). None if unsupported."""
        return None

    def debug_support(self) -> DebugSupport | None:
        """What the gdb stub can ask of this accelerator's vCPUs; None if nothing."""
        return None

    @abstractmethod
    def close(self) -> None: ...


class Accelerator(ABC):
    """The machine asks an accelerator what it needs to know; it never asks which one it is.

    `name` is for the user's eyes only (--stats, notices).
    """

    name: str
    # Whether virtio-blk's compiled request path (devices/virtio/blk_requests.py) may carry out
    # this accelerator's guests' disk requests.
    compiled_blk_requests: bool = True

    def can_run_linux(self) -> tuple[bool, str]:
        """Whether a Linux kernel can boot on this accelerator on this host, and if not, why."""
        return True, ""

    def linux_cmdline_additions(self) -> list[str]:
        """Kernel parameters a Linux guest needs, or runs much better with, on this accelerator on
        this host; each is added where the user's command line does not set it."""
        return []

    @abstractmethod
    def create_vm(self, memory: GuestMemory, io: MachineIo, platform: PlatformOptions) -> VirtualMachine:
        ...

    @abstractmethod
    def close(self) -> None: ...
