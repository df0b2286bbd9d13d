"""Software CPU with the emulated interrupt controllers: PIT timer interrupts through the
8259 into a halted and into a busy guest, HLT that sleeps, device interrupts from other
threads, INIT/SIPI bringing up a second vCPU."""

from __future__ import annotations

import threading
import time

import pytest

from tests.unit.tcg_support import TcgMachine, assemble, run_in_thread
from vmm.exits import Interrupted

# Real mode: 8259 master at vector 0x20, PIT channel 0 at about 1 kHz, the
# handler counts ticks. First halt until 5 ticks, then spin (interrupts on,
# no exits at all) until 10: only the VMM can get the timer in.
TIMER_GUEST = r"""
    .code16
    mov %cs, %ax
    mov %ax, %ds
    xor %bx, %bx
    mov %bx, %es
    mov %bx, %ss
    mov $0x1000, %sp
    movw $timer, %es:(0x20 * 4)
    movw %ax, %es:(0x20 * 4 + 2)
    mov $0x11, %al                  /* ICW1: edge, cascade, ICW4 */
    out %al, $0x20
    mov $0x20, %al                  /* ICW2: vectors 0x20-0x27 */
    out %al, $0x21
    mov $0x04, %al                  /* ICW3: slave on IRQ2 */
    out %al, $0x21
    mov $0x01, %al                  /* ICW4: 8086 mode */
    out %al, $0x21
    mov $0xfe, %al                  /* only IRQ0 */
    out %al, $0x21
    mov $0x34, %al                  /* channel 0, lo/hi, mode 2 */
    out %al, $0x43
    mov $1193 & 0xff, %al
    out %al, $0x40
    mov $1193 >> 8, %al
    out %al, $0x40
    sti
1:  hlt
    cmpw $5, ticks
    jb 1b
    mov $'h', %al
    out %al, $0xe9
2:  cmpw $10, ticks                 /* busy: no exit, no hlt */
    jb 2b
    mov $'b', %al
    out %al, $0xe9
    mov $0, %al
    out %al, $0xf4
    hlt
timer:
    incw %cs:ticks
    push %ax
    mov $0x20, %al                  /* EOI */
    out %al, $0x20
    pop %ax
    iret
ticks: .word 0
"""


@pytest.fixture
def machine():
    m = TcgMachine(irqchip=True)
    yield m
    m.close()


def test_pit_interrupts_reach_a_halted_and_a_spinning_guest(machine, tmp_path):
    machine.load(assemble(TIMER_GUEST, tmp_path))
    run_in_thread(machine)
    assert bytes(machine.output.data) == b"hb"
    assert machine.exit.status == 0
    # The ten ticks went through the guest's IVT by the engine's own code
    # (vmm/tcg/native_interrupts.py): Python built no frame.
    assert machine.vm.delivery.delivered == 0


def test_halted_guest_sleeps_instead_of_spinning(machine, tmp_path):
    # Interrupts on, nothing programmed: HLT must block in the VMM, not burn the host CPU.
    machine.load(assemble(".code16\n sti\n1: hlt\n jmp 1b\n", tmp_path))
    vcpu = machine.vcpus[0]
    before = time.process_time()
    threading.Timer(0.3, vcpu.kick).start()
    assert isinstance(vcpu.run(), Interrupted)
    # Not a speed check: the CPU time this process burnt while the guest was
    # halted for 0.3 s of wall time. Busy waiting would burn all of it;
    # other processes' load does not count here.
    assert time.process_time() - before < 0.15


# Real mode: a handler for vector 0x24 (label `handler`, to be defined by the rest of
# the guest) and the 8259 set up with IRQ4 at that vector, the only line unmasked.
PIC_IRQ4_GUEST_START = r"""
    .code16
    mov %cs, %ax
    mov %ax, %ds
    xor %bx, %bx
    mov %bx, %es
    mov %bx, %ss
    mov $0x1000, %sp
    movw $handler, %es:(0x24 * 4)
    movw %ax, %es:(0x24 * 4 + 2)
    mov $0x11, %al
    out %al, $0x20
    mov $0x20, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xef, %al                  /* only IRQ4 */
    out %al, $0x21
"""


def test_device_interrupt_from_another_thread_wakes_the_halted_guest(machine, tmp_path):
    source = PIC_IRQ4_GUEST_START + r"""
    mov $'r', %al                   /* ready: the PIC is set up */
    out %al, $0xe9
    sti
1:  hlt
    jmp 1b
handler:
    mov $'i', %al
    out %al, $0xe9
    mov $0x20, %al
    out %al, $0x20
    mov $0, %al
    out %al, $0xf4
    hlt
"""
    machine.load(assemble(source, tmp_path))
    line = machine.vm.irq_line(4)

    def pulse_once_ready():
        # Not before the guest's ICW1, which clears pending requests: a pulse on a
        # timer lost that race when the host was busy, and the guest halted forever.
        deadline = time.monotonic() + 20
        while b"r" not in bytes(machine.output.data) and time.monotonic() < deadline:
            time.sleep(0.01)
        line.pulse()

    threading.Thread(target=pulse_once_ready, daemon=True).start()
    run_in_thread(machine)
    assert bytes(machine.output.data) == b"ri"


def test_an_acknowledged_interrupt_the_guest_could_not_take_yet_survives_the_slice_end(machine):
    # A vector kept from an earlier slice (acknowledged, not yet deliverable) and a slice that
    # handed nothing to the engine: the slice's end must not drop the kept vector (its
    # in-service bit would stay set for good), nor invent one.
    vcpu = machine.vcpus[0]
    injector = vcpu.engine.injector
    vcpu._withdrawn = 0x30
    vcpu._take_back_undelivered()
    assert vcpu._withdrawn == 0x30
    # An interrupt handed to the engine and not delivered comes back to this vCPU.
    vcpu._withdrawn = None
    injector.inject(0x31)
    vcpu._take_back_undelivered()
    assert vcpu._withdrawn == 0x31
    assert injector.withdraw() is None


class PulsingPort:
    """A device that raises its interrupt inside the guest's own write to it, as a disk that
    completes a request inside the queue notification does."""

    def __init__(self, line) -> None:
        self.line = line

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.line.pulse()


# Real mode, the 8259's IRQ4 at vector 0x24. The guest writes the device's port with
# interrupts enabled (or, with `cli` for CLI, disabled until a later `sti`), then spins
# until the handler has run: no exit in between that would end the engine's run.
DEVICE_GUEST = PIC_IRQ4_GUEST_START + r"""
    sti
    CLI
    out %al, $0x80                  /* the device raises IRQ4 in this access */
    mov $'a', %al
    out %al, $0xe9
    sti
1:  cmpb $0, done
    je 1b
    mov $0, %al
    out %al, $0xf4
    hlt
handler:
    movb $1, %cs:done
    push %ax
    mov $'i', %al
    out %al, $0xe9
    mov $0x20, %al
    out %al, $0x20
    pop %ax
    iret
done: .byte 0
"""


@pytest.mark.parametrize("interrupts_enabled", [True, False])
def test_an_interrupt_raised_in_the_guests_own_access_is_delivered_without_ending_the_run(
        machine, tmp_path, monkeypatch, interrupts_enabled):
    machine.io.pio.register(0x80, 1, PulsingPort(machine.vm.irq_line(4)), "pulsing")
    source = DEVICE_GUEST.replace("CLI", "" if interrupts_enabled else "cli")
    machine.load(assemble(source, tmp_path))
    engine = machine.vcpus[0].engine
    runs = []
    real_start = engine.start
    monkeypatch.setattr(engine, "start", lambda rip: (runs.append(rip), real_start(rip)))
    run_in_thread(machine)
    assert machine.exit.status == 0
    assert machine.vm.delivery.delivered == 0  # the engine's own delivery, not Python's
    if interrupts_enabled:
        # Handed to the engine inside the access and taken at the next block: one engine
        # run from the first instruction to the exit port, and the handler ran before the
        # guest got far (the block with the access ends at the `out` to port 0xe9).
        assert bytes(machine.output.data) in (b"ia", b"ai")
        assert len(runs) == 1
    else:
        # IF was clear: the interrupt waits for the `sti`, then comes before the spin.
        assert bytes(machine.output.data) == b"ai"
