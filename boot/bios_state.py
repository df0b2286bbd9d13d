"""What a PC BIOS leaves behind, for the multiboot kernels pyvmm enters without firmware.

QEMU boots a `-kernel` multiboot image after SeaBIOS has run, and kernels
written for a PC rely on what it leaves: kvm-unit-tests' real-mode test waits
in `sti; hlt` for the BIOS timer, and hobby kernels drop back to real mode or
count BIOS ticks. pyvmm gives a multiboot kernel the same state (after
SeaBIOS's src/hw/pic.c and src/hw/timer.c):

- the 8259s initialised: IRQ 0-7 at vectors 0x08-0x0F, IRQ 8-15 at
  0x70-0x77, every line masked but the cascade (IRQ 2) and the timer (IRQ 0);
- PIT channel 0 in mode 2 with the full count (65536): IRQ 0 at 18.2 Hz;
- an interrupt vector table: every vector points at an IRET; the hardware
  interrupt vectors at handlers that acknowledge the 8259s (end of
  interrupt); IRQ 0's handler also counts ticks in the BIOS data area and
  calls INT 1Ch, the user timer hook, as a BIOS does;
- the BIOS data area: COM1's port, the equipment word (one serial port),
  the base memory size (639 KiB, up to the EBDA) and the EBDA's segment,
  whose first byte gives its size (1 KiB).

The local APICs are already in virtual-wire mode (LINT0 ExtINT) after reset,
on both accelerators. The 8259s and the PIT are programmed by an entry stub
that runs before the kernel, in the protected mode the kernel is entered in,
with the port writes a BIOS makes, so the same bytes work whichever interrupt
controllers serve them (KVM's in-kernel ones or pyvmm's models on the
software CPU). It ends with a far jump to the kernel's entry, EAX holding the
multiboot magic (EBX, the information's address, is untouched).

The handlers and the stub are hand-assembled, as boot/reset_stub.py is; they
sit in the BIOS area's last page but one (F000:E000).
"""

from __future__ import annotations

import struct

from devices.pic import MASTER_PORT as PIC_MASTER_PORT
from devices.pic import SLAVE_PORT as PIC_SLAVE_PORT
from devices.pit import PORT as PIT_PORT
from devices.uart import COM1_PORT
from vmm.layout import BIOS_CODE_ADDRESS, EBDA_START, KiB
from vmm.memory import GuestMemory

BIOS_SEGMENT = 0xF000
IRQ0_VECTOR = 0x08  # the 8259 master's base
IRQ8_VECTOR = 0x70  # the 8259 slave's base
USER_TIMER_VECTOR = 0x1C  # INT 1Ch, called on every tick
IVT_ENTRIES = 256

# The BIOS data area (segment 0x40).
BDA_COM_PORTS = 0x400  # four words: COM1-COM4
BDA_EBDA_SEGMENT = 0x40E
BDA_EQUIPMENT = 0x410
BDA_BASE_MEMORY_KIB = 0x413
BDA_TIMER_TICKS = 0x46C  # dword, incremented by IRQ 0
EQUIPMENT_ONE_SERIAL_PORT = 1 << 9  # bits 9-11: number of serial ports
EBDA_SIZE_KIB = 1

PIC_ICW1_INIT_WITH_ICW4 = 0x11
PIC_ICW3_SLAVE_ON_IRQ2 = 0x04  # master: a slave on line 2
PIC_ICW3_SLAVE_ID = 0x02  # slave: its line on the master
PIC_ICW4_8086 = 0x01
PIC_EOI = 0x20
MASTER_MASK = 0xFF & ~(1 << 0 | 1 << 2)  # the timer and the cascade
SLAVE_MASK = 0xFF
PIT_CONTROL_PORT = PIT_PORT + 3
PIT_CHANNEL0_WORD_MODE2 = 0x34  # channel 0, low then high byte, mode 2 (rate generator), binary

# Real-mode handlers (16-bit code), each ending in IRET.
IRET = bytes([0xCF])
EOI_MASTER = bytes([
    0x50,                        # push ax
    0xB0, PIC_EOI,               # mov al, 0x20
    0xE6, PIC_MASTER_PORT,       # out 0x20, al
    0x58,                        # pop ax
    0xCF,                        # iret
])
EOI_BOTH = bytes([
    0x50,                        # push ax
    0xB0, PIC_EOI,               # mov al, 0x20
    0xE6, PIC_SLAVE_PORT,        # out 0xa0, al
    0xE6, PIC_MASTER_PORT,       # out 0x20, al
    0x58,                        # pop ax
    0xCF,                        # iret
])
TIMER = bytes([
    0x1E,                        # push ds
    0x50,                        # push ax
    0x31, 0xC0,                  # xor ax, ax
    0x8E, 0xD8,                  # mov ds, ax
    0xFF, 0x06, *struct.pack("<H", BDA_TIMER_TICKS),      # inc word [0x46c]
    0x75, 0x04,                  # jnz over the next instruction
    0xFF, 0x06, *struct.pack("<H", BDA_TIMER_TICKS + 2),  # inc word [0x46e]
    0xCD, USER_TIMER_VECTOR,     # int 0x1c
    0xB0, PIC_EOI,               # mov al, 0x20
    0xE6, PIC_MASTER_PORT,       # out 0x20, al
    0x58,                        # pop ax
    0x1F,                        # pop ds
    0xCF,                        # iret
])


def _out(port: int, value: int) -> bytes:
    """mov al, value; out port, al (the same bytes in 16- and 32-bit code)."""
    return bytes([0xB0, value, 0xE6, port])


PIC_AND_PIT_SETUP = b"".join([
    _out(PIC_MASTER_PORT, PIC_ICW1_INIT_WITH_ICW4), _out(PIC_SLAVE_PORT, PIC_ICW1_INIT_WITH_ICW4),
    _out(PIC_MASTER_PORT + 1, IRQ0_VECTOR), _out(PIC_SLAVE_PORT + 1, IRQ8_VECTOR),
    _out(PIC_MASTER_PORT + 1, PIC_ICW3_SLAVE_ON_IRQ2), _out(PIC_SLAVE_PORT + 1, PIC_ICW3_SLAVE_ID),
    _out(PIC_MASTER_PORT + 1, PIC_ICW4_8086), _out(PIC_SLAVE_PORT + 1, PIC_ICW4_8086),
    _out(PIC_MASTER_PORT + 1, MASTER_MASK), _out(PIC_SLAVE_PORT + 1, SLAVE_MASK),
    _out(PIT_CONTROL_PORT, PIT_CHANNEL0_WORD_MODE2), _out(PIT_PORT, 0), _out(PIT_PORT, 0),  # count 0 = 65536
])


def _entry_stub(entry: int, code_selector: int, eax: int) -> bytes:
    """32-bit code: program the 8259s and the PIT, then enter the kernel."""
    return (PIC_AND_PIT_SETUP
            + bytes([0xB8]) + struct.pack("<I", eax)                          # mov eax, imm32
            + bytes([0xEA]) + struct.pack("<IH", entry, code_selector))       # jmp far selector:entry


def install_bios_state(memory: GuestMemory, entry: int, code_selector: int, eax: int) -> int:
    """Write the IVT, the BIOS data area, the handlers and the entry stub; return the stub's
    address, where the boot vCPU starts (in flat 32-bit protected mode)."""
    code = bytearray()
    offsets = {}
    for name, handler in (("iret", IRET), ("eoi_master", EOI_MASTER), ("eoi_both", EOI_BOTH), ("timer", TIMER)):
        offsets[name] = BIOS_CODE_ADDRESS - (BIOS_SEGMENT << 4) + len(code)
        code += handler
    stub_address = BIOS_CODE_ADDRESS + len(code)
    code += _entry_stub(entry, code_selector, eax)
    memory.write(BIOS_CODE_ADDRESS, bytes(code))

    vectors = [offsets["iret"]] * IVT_ENTRIES
    vectors[IRQ0_VECTOR] = offsets["timer"]
    vectors[IRQ0_VECTOR + 1:IRQ0_VECTOR + 8] = [offsets["eoi_master"]] * 7
    vectors[IRQ8_VECTOR:IRQ8_VECTOR + 8] = [offsets["eoi_both"]] * 8
    memory.write(0, b"".join(struct.pack("<HH", offset, BIOS_SEGMENT) for offset in vectors))

    memory.write(BDA_COM_PORTS, struct.pack("<H", COM1_PORT))
    memory.write(BDA_EBDA_SEGMENT, struct.pack("<H", EBDA_START >> 4))
    memory.write(BDA_EQUIPMENT, struct.pack("<H", EQUIPMENT_ONE_SERIAL_PORT))
    memory.write(BDA_BASE_MEMORY_KIB, struct.pack("<H", EBDA_START // KiB))
    memory.write(BDA_TIMER_TICKS, struct.pack("<I", 0))
    memory.write(EBDA_START, bytes([EBDA_SIZE_KIB]))
    return stub_address
