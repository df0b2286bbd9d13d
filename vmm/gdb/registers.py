"""The x86-64 register set the stub offers gdb, and its target description.

gdb learns the registers, their numbers and sizes from the XML description
it reads with `qXfer:features:read:target.xml` (gdb manual, "Target
Descriptions"). Its x86-64 support looks for the features and names below:
`org.gnu.gdb.i386.core` (general, segment and x87 registers; all required),
`org.gnu.gdb.i386.sse` (XMM and MXCSR), `org.gnu.gdb.i386.segments`
(the FS and GS bases). The control registers and EFER go in a feature of our
own, which gdb shows as plain registers (`info registers cr3`).

Register numbers are positions in `REGISTERS`; the `g` packet is every
register in that order, little-endian, two hex digits a byte, with `xx`
for a register the accelerator cannot give.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

GENERAL = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str
    feature: str
    group: str = ""

    @property
    def size(self) -> int:
        return self.bits // 8


def _table() -> tuple[Register, ...]:
    core, sse = "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"
    pointer = {"rbp": "data_ptr", "rsp": "data_ptr"}
    regs = [Register(name, 64, pointer.get(name, "int64"), core) for name in GENERAL]
    regs.append(Register("rip", 64, "code_ptr", core))
    regs.append(Register("eflags", 32, "int32", core))
    regs += [Register(name, 32, "int32", core) for name in SEGMENTS]
    regs += [Register(f"st{i}", 80, "i387_ext", core) for i in range(8)]
    regs += [Register(name, 32, "int", core, "float") for name in X87_CONTROL]
    regs += [Register(f"xmm{i}", 128, "vec128", sse, "vector") for i in range(16)]
    regs.append(Register("mxcsr", 32, "int", sse, "vector"))
    regs += [Register(name, 64, "int64", "org.gnu.gdb.i386.segments") for name in ("fs_base", "gs_base")]
    regs += [Register(name, 64, "int64", "org.pyvmm.gdb.x86-64.system", "system") for name in CONTROL]
    return tuple(regs)


REGISTERS = _table()
BY_NAME = {reg.name: number for number, reg in enumerate(REGISTERS)}
G_PACKET_SIZE = sum(reg.size for reg in REGISTERS)

_VEC128_TYPES = """  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/>
    <field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/>
    <field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/>
    <field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
"""


def target_xml() -> bytes:
    lines = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             "  <architecture>i386:x86-64</architecture>"]
    feature = None
    for number, reg in enumerate(REGISTERS):
        if reg.feature != feature:
            if feature is not None:
                lines.append("  </feature>")
            feature = reg.feature
            lines.append(f'  <feature name="{feature}">')
            if feature.endswith(".sse"):
                lines.append(_VEC128_TYPES.rstrip("\n"))
        group = f' group="{reg.group}"' if reg.group else ""
        lines.append(f'    <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" regnum="{number}"{group}/>')
    lines += ["  </feature>", "</target>", ""]
    return "\n".join(lines).encode()


def encode(values: Mapping[str, int | None], numbers: range | list[int] | None = None) -> bytes:
    """Registers as gdb's `g` (all) or `p` (one) reply: hex, little-endian, `xx` when unknown."""
    out = []
    for number in numbers if numbers is not None else range(len(REGISTERS)):
        reg = REGISTERS[number]
        value = values.get(reg.name)
        if value is None:
            out.append("xx" * reg.size)
        else:
            out.append((value & ((1 << reg.bits) - 1)).to_bytes(reg.size, "little").hex())
    return "".join(out).encode()


def decode_all(hex_data: bytes) -> dict[str, int]:
    """A `G` packet's registers by name, leaving out those sent as `xx` (unknown);
    raises ValueError when it is not a G packet."""
    if len(hex_data) != 2 * G_PACKET_SIZE:
        raise ValueError(f"G packet of {len(hex_data) // 2} bytes, expected {G_PACKET_SIZE}")
    values, offset = {}, 0
    for reg in REGISTERS:
        field = hex_data[offset:offset + 2 * reg.size]
        offset += 2 * reg.size
        if field != b"xx" * reg.size:
            values[reg.name] = int.from_bytes(bytes.fromhex(field.decode("ascii")), "little")
    return values


def decode_one(number: int, hex_value: bytes) -> tuple[str, int]:
    """A `P` packet's register; raises ValueError (unknown number, wrong size, not hex)."""
    if not 0 <= number < len(REGISTERS):
        raise ValueError(f"no register {number}")
    reg = REGISTERS[number]
    data = bytes.fromhex(hex_value.decode("ascii"))
    if len(data) != reg.size:
        raise ValueError(f"{reg.name} takes {reg.size} bytes, got {len(data)}")
    return reg.name, int.from_bytes(data, "little")
