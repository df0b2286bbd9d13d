"""`--stats`: what the machine counted, printed on stderr when it stops."""

from __future__ import annotations

from collections import Counter

from vmm.machine import Machine


def stats_report(machine: Machine, wall_time: float) -> str:
    lines = [f"pyvmm stats: {wall_time:.3f} s wall time, accelerator {machine.accel_name}"]
    reached = machine.board.userspace_reached if machine.board is not None else None
    if reached is not None:
        lines.append(f"  boot timer: userspace reached {reached:.3f} s after pyvmm started")
    exits = Counter()
    for thread in machine.threads:
        exits.update(thread.exit_counts)
        exits.update(thread.vcpu.dispatched_io_counts())
    lines.append("  exits: " + (", ".join(f"{name} {n}" for name, n in exits.most_common()) or "none"))
    if machine.virtio:
        lines.extend(machine.virtio.stats_lines())
    for bus in (machine.io.pio, machine.io.mmio):
        for entry in bus.ranges:
            if entry.accesses:
                lines.append(f"  {bus.name} {entry.name:<12} {entry.base:#x}+{entry.size:#x}: "
                             f"{entry.accesses} accesses")
        if bus.unclaimed:
            shown = ", ".join(f"{addr:#x} ({n})" for addr, n in sorted(bus.unclaimed.items())[:16])
            lines.append(f"  {bus.name} unclaimed: {shown}")
    return "\n".join(lines)
