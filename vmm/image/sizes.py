"""Sizes as people type them (`10G`, `+512M`, `1.5T`) and as qemu-img prints them (`1 GiB`)."""

from __future__ import annotations

import math
import re

from vmm.errors import PyvmmError

_SUFFIXES = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]?)\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """`1G` -> 1073741824. Suffixes K, M, G, T, P, E are powers of 1024; no suffix means bytes."""
    match = _SIZE_RE.match(text)
    suffix = match.group(2).upper() if match else ""
    if not match or suffix not in _SUFFIXES:
        raise PyvmmError(
            f"invalid {what} {text!r}: expected a number with an optional K, M, G or T suffix"
        )
    number = match.group(1)
    shift = _SUFFIXES[suffix]
    if "." in number:
        whole, _, frac = number.partition(".")
        # Exact arithmetic: 1.5G is 1610612736, not a float rounding of it.
        numerator = int(whole or "0") * 10 ** len(frac) + int(frac or "0")
        value = (numerator << shift) // 10 ** len(frac)
        if (numerator << shift) % 10 ** len(frac):
            raise PyvmmError(f"invalid {what} {text!r}: not a whole number of bytes")
    else:
        value = int(number) << shift
    if value >= 1 << 63:
        raise PyvmmError(f"invalid {what} {text!r}: too large")
    return value


def format_size(value: int) -> str:
    """Like qemu's size_to_str: three significant digits and a binary unit, e.g. `196 KiB`."""
    units = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    # qemu switches unit at 1000 of the smaller unit, hence the 1000/1024 factor.
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = min(max((exponent - 1) // 10, 0), len(units) - 1)
    return f"{value / (1 << (index * 10)):0.3g} {units[index]}B"
