"""What pyvmm tells firmware and firmware-style guests through fw_cfg (devices/fw_cfg.py).

`add_machine_facts` gives every machine the items QEMU's microvm gives:
the RAM size, the CPU count, no graphics (so SeaBIOS prints on COM1), no
boot menu, the PIT's IRQ 0 routed to I/O APIC pin 2 (as the MADT says), and
`etc/e820`, the RAM ranges (le64 address, le64 length, le32 type), from
which SeaBIOS builds the map it hands the OS. Test kernels such as
kvm-unit-tests read the CPU count and RAM size from here too.
"""

from __future__ import annotations

import struct

from devices.fw_cfg import (
    KEY_BOOT_MENU,
    KEY_IRQ0_OVERRIDE,
    KEY_MAX_CPUS,
    KEY_NB_CPUS,
    KEY_NOGRAPHIC,
    KEY_RAM_SIZE,
    FwCfg,
)
from vmm.memory import ram_layout

E820_RAM = 1
E820_ENTRY = struct.Struct("<QQI")


def e820_file(memory_size: int) -> bytes:
    """`etc/e820`: one RAM entry per range of guest RAM (below the MMIO hole, from 4 GiB)."""
    return b"".join(E820_ENTRY.pack(address, size, E820_RAM) for address, size in ram_layout(memory_size))


def add_machine_facts(fw_cfg: FwCfg, memory_size: int, cpus: int) -> None:
    fw_cfg.add_item(KEY_RAM_SIZE, struct.pack("<Q", memory_size))
    fw_cfg.add_item(KEY_NOGRAPHIC, struct.pack("<H", 1))
    fw_cfg.add_item(KEY_NB_CPUS, struct.pack("<H", cpus))
    fw_cfg.add_item(KEY_MAX_CPUS, struct.pack("<H", cpus))
    fw_cfg.add_item(KEY_BOOT_MENU, struct.pack("<H", 0))
    fw_cfg.add_item(KEY_IRQ0_OVERRIDE, struct.pack("<I", 1))
    fw_cfg.add_file("etc/e820", e820_file(memory_size))
