"""What the user asked for, parsed and checked: `MachineConfig` and size parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vmm.errors import PyvmmError

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

MAX_MEMORY = 1 << 40  # 1 TiB: more than any host pyvmm runs on; catches typos like 512G0


def parse_size(text: str, *, default_unit: str = "M", what: str = "size") -> int:
    """'512M', '2G', '1024' (in `default_unit`) -> bytes. Raises PyvmmError on anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGTkmgt]?)(?:i?[Bb])?\s*", text)
    if not match:
        raise PyvmmError(f"invalid {what} {text!r}: use a number with an optional K, M, G or T suffix")
    number, unit = match.groups()
    return int(number) * _SUFFIXES[unit.upper() or default_unit]


@dataclass
class MachineConfig:
    memory: int = 512 << 20
    cpus: int = 1
    accel: str = "auto"
    flat: Path | None = None
    stats: bool = False
    kvm_device: str = "/dev/kvm"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.memory < 1 << 20:
            raise PyvmmError(f"--memory must be at least 1M (got {self.memory} bytes)")
        if self.memory > MAX_MEMORY:
            raise PyvmmError(f"--memory {self.memory >> 30}G is more than pyvmm supports (1T)")
        if self.memory % 4096:
            raise PyvmmError("--memory must be a multiple of 4K")
        if self.cpus < 1:
            raise PyvmmError(f"--cpus must be at least 1 (got {self.cpus})")
        if self.flat is None:
            raise PyvmmError("nothing to boot: give --flat IMAGE")
