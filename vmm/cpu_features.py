"""CPUID feature names the user can add or remove (`--cpu-features -avx,+x2apic`).

Accelerator-neutral: each accelerator applies the edits to the CPUID table it
builds. Names follow Linux's /proc/cpuinfo flags.
"""

from __future__ import annotations

from typing import NamedTuple

from vmm.errors import PyvmmError

# --cpu-vendor: the software CPU's vendor (a KVM guest sees the host's CPU).
CPU_VENDORS = ("intel", "amd")

# name -> (leaf, subleaf, register, bit)
FEATURES: dict[str, tuple[int, int, str, int]] = {
    # leaf 1 ECX
    "pni": (1, 0, "ecx", 0), "pclmulqdq": (1, 0, "ecx", 1), "ssse3": (1, 0, "ecx", 9),
    "fma": (1, 0, "ecx", 12), "cx16": (1, 0, "ecx", 13), "pcid": (1, 0, "ecx", 17),
    "sse4_1": (1, 0, "ecx", 19), "sse4_2": (1, 0, "ecx", 20), "x2apic": (1, 0, "ecx", 21),
    "movbe": (1, 0, "ecx", 22), "popcnt": (1, 0, "ecx", 23), "tsc_deadline_timer": (1, 0, "ecx", 24),
    "aes": (1, 0, "ecx", 25), "xsave": (1, 0, "ecx", 26), "avx": (1, 0, "ecx", 28),
    "f16c": (1, 0, "ecx", 29), "rdrand": (1, 0, "ecx", 30), "hypervisor": (1, 0, "ecx", 31),
    # leaf 1 EDX
    "fpu": (1, 0, "edx", 0), "vme": (1, 0, "edx", 1), "pse": (1, 0, "edx", 3), "tsc": (1, 0, "edx", 4),
    "msr": (1, 0, "edx", 5), "pae": (1, 0, "edx", 6), "apic": (1, 0, "edx", 9), "sep": (1, 0, "edx", 11),
    "mtrr": (1, 0, "edx", 12), "pge": (1, 0, "edx", 13), "cmov": (1, 0, "edx", 15), "pat": (1, 0, "edx", 16),
    "clflush": (1, 0, "edx", 19), "mmx": (1, 0, "edx", 23), "fxsr": (1, 0, "edx", 24),
    "sse": (1, 0, "edx", 25), "sse2": (1, 0, "edx", 26), "ht": (1, 0, "edx", 28),
    # leaf 7 EBX/ECX
    "fsgsbase": (7, 0, "ebx", 0), "bmi1": (7, 0, "ebx", 3), "avx2": (7, 0, "ebx", 5),
    "smep": (7, 0, "ebx", 7), "bmi2": (7, 0, "ebx", 8), "erms": (7, 0, "ebx", 9),
    "invpcid": (7, 0, "ebx", 10), "avx512f": (7, 0, "ebx", 16), "rdseed": (7, 0, "ebx", 18),
    "adx": (7, 0, "ebx", 19), "smap": (7, 0, "ebx", 20), "clflushopt": (7, 0, "ebx", 23),
    "umip": (7, 0, "ecx", 2), "pku": (7, 0, "ecx", 3), "la57": (7, 0, "ecx", 16),
    "rdpid": (7, 0, "ecx", 22),
    # leaf 0x80000001
    "lahf_lm": (0x80000001, 0, "ecx", 0), "abm": (0x80000001, 0, "ecx", 5),
    "syscall": (0x80000001, 0, "edx", 11), "nx": (0x80000001, 0, "edx", 20),
    "pdpe1gb": (0x80000001, 0, "edx", 26), "rdtscp": (0x80000001, 0, "edx", 27),
    "lm": (0x80000001, 0, "edx", 29),
}


def feature_bit(name: str) -> int:
    """The mask of feature `name` in its CPUID register (FEATURES says which)."""
    return 1 << FEATURES[name][3]


class FeatureEdit(NamedTuple):
    name: str
    enable: bool

    @property
    def location(self) -> tuple[int, int, str, int]:
        return FEATURES[self.name]


def parse_feature_edits(text: str) -> list[FeatureEdit]:
    """'-avx,+x2apic' -> edits; a bare name means '+name'."""
    edits = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        enable = not item.startswith("-")
        name = item.lstrip("+-").lower()
        if name not in FEATURES:
            raise PyvmmError(f"unknown CPU feature {name!r} in --cpu-features "
                             f"(known: {', '.join(sorted(FEATURES))})")
        edits.append(FeatureEdit(name, enable))
    return edits


REGISTER_INDEX = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}


def apply_feature_edits(registers: dict[tuple[int, int], list[int]], edits: list[FeatureEdit]) -> None:
    """Edit {(leaf, subleaf): [eax, ebx, ecx, edx]} in place."""
    for edit in edits:
        leaf, subleaf, register, bit = edit.location
        values = registers.get((leaf, subleaf))
        if values is None:
            continue  # the leaf does not exist on this CPU: nothing to add to or remove from
        index = REGISTER_INDEX[register]
        if edit.enable:
            values[index] |= 1 << bit
        else:
            values[index] &= ~(1 << bit)
