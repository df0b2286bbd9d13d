"""Random guest accesses against every device model: nothing raises, every read fits.

A guest is untrusted: whatever it reads or writes, at whatever offset and
size, a device must answer the way hardware does (ignore the write, read 0 or
all ones) and never raise (vmm/bus.py). Each rig below builds devices
the way the devices' plug() functions and vmm/tcg/vm.py do, with recording fakes where the
machine passes callbacks and a fake clock where a device reads time (so runs
repeat exactly), then hypothesis plays a random sequence of reads and writes
at offsets inside each registered range and a few just past its end, with
sizes 1, 2, 4 and 8 and values from 0 to all ones. Host-side events (bytes
arriving at the UART, devices raising and lowering interrupt lines, the
clock moving on, a vCPU asking for and acknowledging interrupts) are mixed
in, since they change which registers mean what.

The interrupt controllers are fuzzed twice: each model on its own, and all of
them behind an InterruptRouter attached to real buses, as the software CPU
uses them, with the machine's devices wired to the router's lines.
"""

from __future__ import annotations

import calendar
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from boot.firmware import add_machine_facts
from devices.acpi_pm import AcpiPmTimer, AcpiPowerManagement
from devices.boot_timer import BootTimer
from devices.debug_exit import DebugExit
from devices.fw_cfg import PORT_COUNT as FW_CFG_PORT_COUNT
from devices.fw_cfg import FwCfg
from devices.i8042 import AUX_IRQ as I8042_AUX_IRQ
from devices.i8042 import COMMAND_PORT as I8042_COMMAND_PORT
from devices.i8042 import DATA_PORT as I8042_DATA_PORT
from devices.i8042 import I8042
from devices.i8042 import KEYBOARD_IRQ as I8042_KEYBOARD_IRQ
from devices.interrupts import InterruptRouter
from devices.ioapic import WINDOW_SIZE as IOAPIC_SIZE
from devices.ioapic import IoApic
from devices.lapic import REG_TPR, LocalApic, NullLapicHost
from devices.lapic import WINDOW_SIZE as LAPIC_SIZE
from devices.legacy import QUIET_PORTS, ResetControlRegister, SilentDevice, SystemControlPortA
from devices.pic import PicPair
from devices.pit import Pit
from devices.pvpanic import PvPanic
from devices.rtc import CENTURY, STATUS_B, YEAR, CmosRtc
from devices.testdev import TEST_DEVICE_SIZE, ScratchDevice
from devices.uart import COM1_IRQ, COM1_PORT, Uart16550
from tests.fuzzing import fuzz_settings
from vmm import layout
from vmm.bus import Bus, NullIrqLine
from vmm.memory import GuestMemory

SIZES = (1, 2, 4, 8)
JUST_OUTSIDE = 8  # how far past a range's end accesses may land
START_NS = 1_700_000_000 * 10**9  # the fake clock starts in 2023, in ns since the epoch
# The local APIC timer clock vmm/tcg/vm.py gives the router (not imported from
# there: that would make these device tests need Unicorn).
LAPIC_TIMER_HZ = 25_000_000

# PYVMM_FUZZ_EXAMPLES=5000 makes a longer, randomised hunt (tests/fuzzing.py).
FUZZ = fuzz_settings(25)


class FakeClock:
    def __init__(self) -> None:
        self.now = START_NS

    def ns(self) -> int:
        return self.now

    def seconds(self) -> float:
        return self.now / 1e9


class Calls:
    """Records the machine-level callbacks devices make (reset, power-off, panic...)."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def __call__(self, name: str):
        return lambda *args, **kwargs: self.log.append((name, args, kwargs))


@dataclass
class Rig:
    """Devices as the machine registers them: (name, device, range size) each,
    plus host-side actions that take one random int."""

    ranges: list[tuple[str, object, int]]
    clock: FakeClock
    actions: list = field(default_factory=list)
    # Values worth writing more often than chance would (register indexes, enable
    # bits, init words): a dictionary, as coverage-guided fuzzers use.
    hints: tuple[int, ...] = ()
    # Index/data register pairs, (range number, index offset, data offset, the
    # indexes of its registers): an access through the pair selects a register
    # (mostly a real one) and reads or writes it at once.
    pairs: tuple[tuple[int, int, int, tuple[int, ...]], ...] = ()


# CMOS indexes: the time and status registers and the century.
RTC_REGISTERS = (*range(0x0E), CENTURY)
# Status B with SET (time frozen while the guest writes it), 12-hour and binary
# modes in each combination, and time values that are not BCD.
RTC_HINTS = (0x80, 0x82, 0x84, 0x86, 0x02, 0x06, 0x99, 0xFF, 0xA0, 0xC8, 0x59, 0x12, 0x92)
# ICW1 (edge, cascade, ICW4), vector bases, ICW4 with and without AEOI, OCW3 read
# ISR / poll / special mask, EOIs.
PIC_HINTS = (0x11, 0x19, 0x13, 0x20, 0x28, 0x01, 0x03, 0x04, 0x02, 0x0A, 0x0B, 0x0C, 0x68, 0x48, 0x60, 0xA0, 0xE0)
# Control words: each channel in modes 0-5 with word access, latch, read-back; port 0x61 gate.
PIT_HINTS = (0x30, 0x34, 0x36, 0x32, 0x3A, 0xB0, 0xB6, 0xB2, 0x74, 0x00, 0x40, 0x80, 0xC2, 0xE2, 0xD2, 0x3F, 0x01)
# I/O APIC: ID, version, arbitration, the redirection entries (IOREGSEL values);
# fixed/lowest-priority/NMI/INIT/SIPI, edge and level, masked and not.
IOAPIC_REGISTERS = tuple(range(0x40))
IOAPIC_HINTS = (0x40, 0xA031, 0x8031, 0x1A031, 0x8131, 0x8431, 0x0500, 0x0600, 0x0F00_0000, 0xFF00_0000)
# SVR enabled, LVT timer periodic/one-shot, divide configs, ICR INIT/SIPI/fixed/NMI
# with each shorthand, logical destinations.
LAPIC_HINTS = (0x1FF, 0x10FF, 0x20030, 0x30, 0x0B, 0x03, 0x4500, 0x4600, 0x4608, 0x4030, 0xC4030,
               0x84030, 0x44030, 0x400, 0x8500, 0x0100_0000, 0xFF00_0000, 0x0FFF_FFFF, 1000, 1)


def uart_rig() -> Rig:
    sent: list[bytes] = []
    uart = Uart16550(NullIrqLine(), sent.append, room_available=lambda: None, host_buffer_size=64)

    def receive(arg: int) -> None:
        data = bytes((arg + i) & 0xFF for i in range(arg % 40))
        taken = uart.receive(data, drop_excess=bool(arg & 0x100))
        assert 0 <= taken <= len(data)

    return Rig([("com1", uart, 8)], FakeClock(), [receive])


def i8042_rig() -> Rig:
    calls = Calls()
    i8042 = I8042(calls("reset"), kbd_irq=NullIrqLine(), aux_irq=NullIrqLine())
    return Rig([("i8042-data", i8042.data_port, 1), ("i8042-cmd", i8042.command_port, 1),
                ("i8042-whole", i8042, 5)], FakeClock())


def rtc_rig() -> Rig:
    clock = FakeClock()
    rtc = CmosRtc(clock=clock.seconds, low_memory=layout.MMIO_HOLE_START, high_memory=3 * layout.GiB)
    return Rig([("rtc", rtc, 2)], clock, hints=RTC_HINTS, pairs=((0, 0, 1, RTC_REGISTERS),))


def small_port_rig() -> Rig:
    """The one-register devices and the legacy quiet ports."""
    calls = Calls()
    clock = FakeClock()
    ranges = [
        ("pvpanic", PvPanic(calls("panic"), crash_loaded=calls("crash")), 1),
        ("boot-timer", BootTimer(clock.seconds(), clock=clock.seconds, on_mark=calls("mark")), 1),
        ("acpi-pm", AcpiPowerManagement(power_off=calls("off"), reset=calls("reset")), 3),
        ("acpi-pm-timer", AcpiPmTimer(clock.ns), 4),
        ("debug-exit", DebugExit(calls("stop")), 1),
        ("post-code", SilentDevice(), 1),
        ("port-a", SystemControlPortA(calls("reset")), 1),
        ("reset-control", ResetControlRegister(calls("reset")), 1),
    ]
    ranges += [(q.name, SilentDevice(q.read_value), q.size) for q in QUIET_PORTS]
    return Rig(ranges, clock)


def scratch_rig() -> Rig:
    return Rig([("scratch", ScratchDevice(), TEST_DEVICE_SIZE)], FakeClock())


def pic_pit_rig() -> Rig:
    """The 8259 pair and the 8254 on their own, inputs driven directly."""
    clock = FakeClock()
    pic = PicPair()
    pit = Pit(NullIrqLine(), clock.ns)

    def drive_irq(arg: int) -> None:
        irq = arg % 16
        if irq != 2:
            pic.set_irq(irq, bool(arg & 0x10))

    def inta(arg: int) -> None:
        if pic.has_interrupt():
            assert 0 <= pic.acknowledge() <= 0xFF

    def gate(arg: int) -> None:
        pit.set_gate(arg % 3, bool(arg & 4))
        pit.update()

    hints = PIC_HINTS + PIT_HINTS
    return Rig([("8259 master", pic.master, 2), ("8259 slave", pic.slave, 2), ("ELCR", pic.elcr, 2),
                ("8254", pit, 4), ("port 0x61", pit.speaker, 1)], clock, [drive_irq, inta, gate], hints)


def ioapic_rig() -> Rig:
    sent: list = []
    ioapic = IoApic(sent.append)

    def pin(arg: int) -> None:
        ioapic.set_level(arg % 24, bool(arg & 0x20))

    def eoi(arg: int) -> None:
        ioapic.eoi(arg & 0xFF)

    return Rig([("I/O APIC", ioapic, IOAPIC_SIZE)], FakeClock(), [pin, eoi], IOAPIC_HINTS,
               pairs=((0, 0x00, 0x10, IOAPIC_REGISTERS),))


def lapic_rig() -> Rig:
    clock = FakeClock()
    apic = LocalApic(0, NullLapicHost(), clock.ns, LAPIC_TIMER_HZ)
    apic.set_firmware_defaults()

    def cpu(arg: int) -> None:
        apic.update(clock.now)
        vector = apic.acknowledge() if arg & 1 else apic.highest_deliverable()
        assert vector is None or 0 <= vector <= 0xFF
        if arg & 2:
            apic.accept(arg >> 8 & 7, arg >> 16 & 0xFF, bool(arg & 4))
        if arg & 8:
            apic.lint1()
        if arg & 16:  # hardware-disable or re-enable it through the APIC base MSR
            apic.set_apic_base_msr(apic.apic_base_msr() ^ (arg >> 8 & 0x800))
        apic.take_nmi()

    return Rig([("local APIC", apic, LAPIC_SIZE)], clock, [cpu], LAPIC_HINTS)


class BusView:
    """One registered bus range, seen through the bus (routing and all)."""

    def __init__(self, bus: Bus, base: int) -> None:
        self._bus = bus
        self._base = base

    def read(self, offset: int, size: int) -> int:
        return self._bus.read(self._base + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._bus.write(self._base + offset, size, value)


def router_rig() -> Rig:
    """The software CPU's machine: controllers behind an InterruptRouter attached
    to the buses as vmm/tcg/vm.py does, and the machine's devices on its lines."""
    clock = FakeClock()
    calls = Calls()
    pio, mmio = Bus("pio"), Bus("mmio")
    cpus = 3
    current = [0]
    router = InterruptRouter(cpus, clock=clock.ns, wake=calls("wake"), wake_cpu=calls("wake_cpu"),
                             on_init=calls("init"), on_sipi=calls("sipi"), lapic_bus_hz=LAPIC_TIMER_HZ)
    router.attach(pio, mmio, current_cpu=lambda: current[0])
    # As uart.plug and i8042.plug do, with the router's lines as the VM's irq_line().
    uart = Uart16550(router.irq_line(COM1_IRQ), lambda data: None, host_buffer_size=64)
    pio.register(COM1_PORT, 8, uart, "com1")
    i8042 = I8042(calls("reset"), kbd_irq=router.irq_line(I8042_KEYBOARD_IRQ),
                  aux_irq=router.irq_line(I8042_AUX_IRQ))
    pio.register(I8042_DATA_PORT, 1, i8042.data_port, "i8042-data")
    pio.register(I8042_COMMAND_PORT, 1, i8042.command_port, "i8042-cmd")
    # The RTC and the quiet legacy ports raise no interrupt: rtc_rig and
    # small_port_rig cover them, and leaving them out keeps accesses on the rest.

    # Extra lines for the fuzzer to drive, two per GSI so wire-OR is exercised.
    gsis = [gsi for gsi in range(24) if gsi != 2]
    lines = [router.irq_line(gsi) for gsi in gsis for _ in range(2)]

    def line(arg: int) -> None:
        chosen = lines[arg % len(lines)]
        if arg & 0x100:
            chosen.pulse()
        else:
            chosen.set_level(bool(arg & 0x200))

    def switch_cpu(arg: int) -> None:
        current[0] = arg % cpus

    def vcpu(arg: int) -> None:
        """What a vCPU asks at an instruction boundary, and its task priority."""
        cpu = arg % cpus
        op = (arg >> 2) % 6
        if op == 0:
            assert isinstance(router.has_interrupt(cpu), bool)
        elif op == 1:
            vector = router.acknowledge(cpu)
            assert vector is None or 0 <= vector <= 0xFF
        elif op == 2:
            router.has_nmi(cpu)
            router.take_nmi(cpu)
        elif op == 3:
            router.update()
            deadline = router.next_deadline()
            assert deadline is None or isinstance(deadline, int)
        elif op == 4:
            router.lapic_write(cpu, REG_TPR, 4, arg >> 8)
            assert 0 <= router.lapic_read(cpu, REG_TPR, 4) <= 0xFF
        else:
            router.update(clock.now)

    def receive(arg: int) -> None:
        uart.receive(bytes((arg + i) & 0xFF for i in range(arg % 20)), drop_excess=True)

    ranges = [(f"{bus.name} {entry.name}", BusView(bus, entry.base), entry.size)
              for bus in (pio, mmio) for entry in bus.ranges]
    names = [name for name, _, _ in ranges]
    pairs = ((names.index("mmio I/O APIC"), 0x00, 0x10, IOAPIC_REGISTERS),)
    hints = PIC_HINTS + PIT_HINTS + IOAPIC_HINTS + LAPIC_HINTS
    return Rig(ranges, clock, [line, switch_cpu, vcpu, receive], hints, pairs)


# fw_cfg: the keys that exist, the file directory, the write bit; DMA
# descriptors at FW_CFG_DMA (big-endian) that the host side writes.
FW_CFG_DMA = 0x1000
FW_CFG_HINTS = (0x00, 0x01, 0x03, 0x05, 0x19, 0x20, 0x21, 0x4000, 0x8002, 0xFFFF,
                int.from_bytes(FW_CFG_DMA.to_bytes(4, "big"), "little"))  # the address as a DMA register write


def fw_cfg_rig() -> Rig:
    memory = GuestMemory(1 << 20)  # freed with the rig
    fw_cfg = FwCfg(memory)
    add_machine_facts(fw_cfg, memory.size, 2)

    def descriptor(arg: int) -> None:
        control = (arg & 0xFFFF) << 16 | (arg >> 16) & 0x1F  # a key, then SELECT/READ/SKIP/WRITE/ERROR bits
        length = (arg >> 8) & 0xFFFF if arg & 1 else arg & 0xFFFF_FFFF
        address = (arg * 4099) % (2 << 20)  # inside and past guest RAM
        memory.write(FW_CFG_DMA, struct.pack(">IIQ", control, length, address))

    return Rig([("fw_cfg", fw_cfg, FW_CFG_PORT_COUNT)], FakeClock(), [descriptor], hints=FW_CFG_HINTS)


RIGS = [uart_rig, i8042_rig, rtc_rig, small_port_rig, scratch_rig, pic_pit_rig, ioapic_rig, lapic_rig, router_rig,
        fw_cfg_rig]


# -- the strategies -------------------------------------------------------------------


def offsets(size: int) -> st.SearchStrategy[int]:
    inside = st.integers(0, size - 1)
    outside = st.integers(size, size + JUST_OUTSIDE)
    if size <= 16:
        return st.one_of(inside, inside, inside, outside)
    # Big windows (the APICs) have their registers 16 bytes apart near the start.
    registers = st.integers(0, min(size, 0x400) // 16 - 1).map(lambda index: index * 16)
    return st.one_of(registers, registers, registers, st.tuples(registers, st.integers(1, 15)).map(sum),
                     inside, outside)


@st.composite
def values(draw, size: int, hints: tuple[int, ...]) -> int:
    ones = (1 << (8 * size)) - 1
    if hints and draw(st.booleans()):
        return draw(st.sampled_from(hints)) & ones
    # Small values often: they are the register indexes of the index/data pairs (RTC, I/O APIC).
    return draw(st.one_of(st.just(0), st.just(ones), st.integers(0, ones), st.integers(0, 0xFF),
                          st.integers(0, 0x40),
                          st.integers(0, 8 * size - 1).map(lambda bit: 1 << bit)))


@st.composite
def step(draw, rig: Rig) -> list[tuple]:
    """One thing the guest or the host does: usually one access, a few for a register pair."""
    kind = draw(st.sampled_from(("read", "write", "write", "tick", "host", "pair")))
    if kind in ("read", "write"):
        index = draw(st.integers(0, len(rig.ranges) - 1))
        offset = draw(offsets(rig.ranges[index][2]))
        size = draw(st.sampled_from(SIZES))
        return [(kind, index, offset, size, draw(values(size, rig.hints)) if kind == "write" else None)]
    if kind == "tick":
        return [("tick", draw(st.one_of(st.integers(0, 10**6), st.integers(0, 10**10), st.integers(0, 10**16))))]
    if kind == "host" and rig.actions:
        return [("host", draw(st.integers(0, len(rig.actions) - 1)), draw(st.integers(0, 2**32)))]
    if kind == "pair" and rig.pairs:
        index, index_offset, data_offset, registers = draw(st.sampled_from(rig.pairs))
        register = draw(st.one_of(st.sampled_from(registers), st.sampled_from(registers),
                                  st.sampled_from(registers), st.integers(0, 0xFF)))
        ops = [("write", index, index_offset, 1, register)]
        if draw(st.booleans()):
            size = draw(st.sampled_from(SIZES))
            ops.append(("write", index, data_offset, size, draw(values(size, rig.hints))))
        # Read back what the register holds now, mostly a byte at a time as drivers do.
        ops.append(("read", index, data_offset, draw(st.sampled_from((1, 1, 1, 2, 4, 8))), None))
        return ops
    return []


def operations(rig: Rig) -> st.SearchStrategy[list[tuple]]:
    # A list of steps rather than a loop of draws, so that hypothesis shrinks a
    # failure to the few steps that matter.
    return st.lists(step(rig), min_size=20, max_size=80).map(lambda steps: [op for ops in steps for op in ops])


def replay(rig: Rig, ops: list[tuple]) -> list[tuple[str, int, int, object]]:
    """Play `ops` (any exception fails the test); returns the reads as (device, offset, size, value)."""
    reads = []
    for op in ops:
        if op[0] == "read":
            _, index, offset, size, _ = op
            name, device, _ = rig.ranges[index]
            reads.append((name, offset, size, device.read(offset, size)))
        elif op[0] == "write":
            _, index, offset, size, value = op
            rig.ranges[index][1].write(offset, size, value)
        elif op[0] == "tick":
            rig.clock.now += op[1]
        else:
            rig.actions[op[1]](op[2])
    return reads


@pytest.mark.parametrize("build", RIGS, ids=lambda build: build.__name__)
@FUZZ
@given(data=st.data())
def test_random_accesses_never_raise_and_reads_fit(build, data) -> None:
    rig = build()
    reads = replay(rig, data.draw(operations(rig), label="operations"))
    misfits = [(name, f"{offset:#x}", size, value) for name, offset, size, value in reads
               if type(value) is not int or not 0 <= value < 1 << (8 * size)]
    assert misfits == []  # every read is an int that fits its access size


# -- regressions for what the fuzzer found --------------------------------------------


def _cmos(rtc: CmosRtc, index: int, value: int | None = None) -> int | None:
    rtc.write(0, 1, index)
    if value is None:
        return rtc.read(1, 1)
    rtc.write(1, 1, value)
    return None


def test_rtc_time_register_holding_a_non_bcd_byte_reads_back_as_one_byte() -> None:
    # Found by this fuzzer: with SET holding the clock, 0xFF written to a BCD time
    # register decoded to 165 and read back as 0x105, wider than the register.
    rtc = CmosRtc(clock=lambda: calendar.timegm((2024, 2, 27, 13, 45, 56, 0, 0, 0)))
    _cmos(rtc, STATUS_B, 0x82)  # SET, 24-hour, BCD
    for index in (0x00, 0x02, 0x04, 0x07, 0x08, YEAR, CENTURY):
        _cmos(rtc, index, 0xFF)
        assert _cmos(rtc, index) == 0x65
    # A binary value the BCD format cannot show, after switching formats while frozen.
    _cmos(rtc, STATUS_B, 0x86)  # SET, 24-hour, binary
    _cmos(rtc, YEAR, 200)
    assert _cmos(rtc, YEAR) == 200
    _cmos(rtc, STATUS_B, 0x82)
    assert _cmos(rtc, YEAR) == 0x00
    # Garbage is dropped when SET is released: the clock runs on from the old time.
    _cmos(rtc, STATUS_B, 0x02)
    assert _cmos(rtc, YEAR) == 0x24
