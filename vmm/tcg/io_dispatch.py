"""Port I/O and MMIO made by software-CPU guest code, handed straight to the machine's buses.

On KVM every access is an exit that the exit loop (vmm/vcpu_thread.py)
dispatches. The software CPU calls its hooks in the middle of emulation, and
leaving `emu_start` for each access would cost about 7 us more than the
access itself, so the hooks dispatch here directly. The counts keep the
exit loop's names (`IoOut`, `IoIn`, `MmioWrite`, `MmioRead`) so that the
statistics of both accelerators read the same.

This is the one place to change if the exit loop wants to see these accesses
itself: replace a vCPU's `io` with any object that has these four methods.
"""

from __future__ import annotations

from collections import Counter

from vmm.accel import MachineIo


class IoDispatcher:
    def __init__(self, io: MachineIo) -> None:
        self.pio = io.pio
        self.mmio = io.mmio
        self.counts: Counter[str] = Counter()

    def port_write(self, port: int, size: int, value: int) -> None:
        self.counts["IoOut"] += 1
        self.pio.write(port, size, value)

    def port_read(self, port: int, size: int) -> int:
        self.counts["IoIn"] += 1
        return self.pio.read(port, size)

    def mmio_write(self, address: int, size: int, value: int) -> None:
        self.counts["MmioWrite"] += 1
        self.mmio.write(address, size, value)

    def mmio_read(self, address: int, size: int) -> int:
        self.counts["MmioRead"] += 1
        return self.mmio.read(address, size)
