"""Helpers for the software-CPU unit tests: assemble a tiny guest, run it on a TcgVcpu.

Guests are GNU assembler source held in the tests themselves, assembled at
test time with `as`/`ld` (Debian package binutils) into a flat image loaded
at `LOAD_ADDRESS`. Port 0xe9 collects bytes written by the guest; port 0xf4
stops the vCPU (as the machine's debug-exit port does) and records the value.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import tests.helpers

pytest.importorskip("unicorn", reason="the software CPU needs unicorn==2.1.4 (pip install unicorn==2.1.4)")

from vmm.accel import MachineIo, PlatformOptions  # noqa: E402
from vmm.bus import Bus  # noqa: E402
from vmm.cpu_state import CpuState  # noqa: E402
from vmm.memory import GuestMemory  # noqa: E402
from vmm.tcg import TcgAccelerator  # noqa: E402

LOAD_ADDRESS = 0x10000
OUTPUT_PORT = 0xE9
EXIT_PORT = 0xF4


def assemble(source: str, workdir: Path, link_address: int = 0, name: str = "guest") -> bytes:
    """Assemble `source` (which picks .code16/.code64 itself) to a flat image linked at `link_address`."""
    path = workdir / f"{name}.S"
    path.write_text(source)
    return tests.helpers.assemble(path, workdir, bits=64, link_address=link_address).read_bytes()


class OutputPort:
    def __init__(self) -> None:
        self.data = bytearray()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.data += value.to_bytes(size, "little")


class ExitPort:
    """Records the status and kicks the vCPU, the way the debug-exit device stops the machine."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.vcpu = None

    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if self.status is None:
            self.status = value
        if self.vcpu is not None:
            self.vcpu.kick()


class TcgMachine:
    """A software-CPU VM with RAM, two test ports and one vCPU, for guests in tests."""

    def __init__(self, memory_size: int = 32 << 20, cpus: int = 1, irqchip: bool = False,
                 cpu_vendor: str | None = None, ports: tuple[tuple[int, int, object], ...] = ()) -> None:
        """`ports`: more devices on the port bus, as (base, size, device)."""
        self.memory = GuestMemory(memory_size)
        self.io = MachineIo(pio=Bus("pio"), mmio=Bus("mmio"))
        self.output = OutputPort()
        self.exit = ExitPort()
        self.io.pio.register(OUTPUT_PORT, 1, self.output, "output")
        self.io.pio.register(EXIT_PORT, 1, self.exit, "exit")
        for base, size, device in ports:
            self.io.pio.register(base, size, device, type(device).__name__)
        self.accel = TcgAccelerator()
        self.vm = self.accel.create_vm(self.memory, self.io,
                                       PlatformOptions(cpus=cpus, irqchip=irqchip, cpu_vendor=cpu_vendor))
        self.vcpus = [self.vm.create_vcpu(i) for i in range(cpus)]
        self.exit.vcpu = self.vcpus[0]

    def load(self, image: bytes, state: CpuState | None = None) -> None:
        self.memory.write(LOAD_ADDRESS, image)
        self.vcpus[0].set_state(state or CpuState.real_mode(LOAD_ADDRESS >> 4, 0))

    def run(self, limit: int = 100):
        """Run vCPU 0 until something other than a kick's `Interrupted` comes back, or the guest exits."""
        vcpu = self.vcpus[0]
        for _ in range(limit):
            result = vcpu.run()
            if type(result).__name__ != "Interrupted" or self.exit.status is not None:
                return result
        raise AssertionError("the guest kept being interrupted")

    def close(self) -> None:
        self.vm.close()
        self.accel.close()
        self.memory.close()


def run_in_thread(machine: TcgMachine, timeout: float = 20.0):
    """`machine.run()` bounded in time: a guest that never finishes (an interrupt lost while
    it halts) fails the test instead of hanging it."""
    results = []
    thread = threading.Thread(target=lambda: results.append(machine.run(limit=10_000)), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        machine.vcpus[0].kick()
        thread.join(5)
        raise AssertionError(f"the guest did not finish; output so far {bytes(machine.output.data)!r}")
    return results[0]


# -- a 64-bit machine set up by the host, as a boot loader leaves it -------------------

# GNU as: SETGATE vec, handler, attr, ist writes a 64-bit IDT gate (kernel CS
# 0x08) for `handler` at IDT + vec * 16; the guest defines IDT.
SETGATE_MACRO = r"""
.macro SETGATE vec, handler, attr, ist
    lea \handler(%rip), %rax
    mov %rax, %rdx
    and $0xffff, %eax
    mov $((0x08 << 16) | (\ist << 32) | (\attr << 40)), %rcx
    or %rcx, %rax
    mov %rdx, %rcx
    shr $16, %rcx
    shl $48, %rcx
    or %rcx, %rax
    mov %rax, IDT + \vec * 16
    shr $32, %rdx
    mov %rdx, IDT + \vec * 16 + 8
.endm
"""

PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
PD_TOP = 0xB000  # the 4th GiB, where the local and I/O APICs are
GDT_BASE, TSS_BASE = 0x500, 0x600
KERNEL_STACK, RSP0, IST1 = 0x7F000, 0x9F000, 0x8F000
SUPERVISOR_ONLY_2M = 0x200000  # the one 2 MiB page ring 3 may not touch
KERNEL_CS, KERNEL_DS, USER_CS, TSS_SELECTOR = 0x08, 0x10, 0x20, 0x28  # 0x18: user data
GDT = [
    0,
    0x00AF9A000000FFFF,  # 0x08 kernel code, 64-bit
    0x00CF92000000FFFF,  # 0x10 kernel data
    0x00CFF2000000FFFF,  # 0x18 user data (SYSRET's SS = STAR[63:48] + 8)
    0x00AFFA000000FFFF,  # 0x20 user code, 64-bit (SYSRET's CS = STAR[63:48] + 16)
]


def long_mode_state(memory: GuestMemory, entry: int) -> CpuState:
    """Identity-map the first and the 4th GiB (2 MiB pages, user-accessible but for one), GDT, TSS."""
    from vmm.cpu_state import CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, Segment

    memory.write_u64(PML4, PDPT | 0x7)
    memory.write_u64(PDPT, PD | 0x7)
    for i in range(512):
        user = 0 if i * (2 << 20) == SUPERVISOR_ONLY_2M else 0x4
        memory.write_u64(PD + 8 * i, (i << 21) | 0x83 | user)  # P, W, PS
        memory.write_u64(PD_TOP + 8 * i, (3 << 30) + (i << 21) | 0x83 | 0x10)  # uncached
    memory.write_u64(PDPT + 8 * 3, PD_TOP | 0x3)
    tss_low = (0x67 | (TSS_BASE & 0xFFFFFF) << 16 | 0x89 << 40 | (TSS_BASE >> 24) << 56)
    for i, descriptor in enumerate(GDT + [tss_low, 0]):
        memory.write_u64(GDT_BASE + 8 * i, descriptor)
    memory.write_u64(TSS_BASE + 4, RSP0)
    memory.write_u64(TSS_BASE + 36, IST1)
    segments = {name: Segment.flat_data(KERNEL_DS) for name in ("ds", "es", "fs", "gs", "ss")}
    segments["cs"] = Segment.flat64_code(KERNEL_CS)
    segments["tr"] = Segment.tss(TSS_SELECTOR, TSS_BASE, 0x67)
    segments["ldt"] = Segment.ldt()
    return CpuState(
        regs={"rip": entry, "rsp": KERNEL_STACK, "rflags": 2},
        segments=segments,
        gdt=(GDT_BASE, 8 * (len(GDT) + 2) - 1),
        idt=(0, 0),
        cr0=CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr3=PML4,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )
