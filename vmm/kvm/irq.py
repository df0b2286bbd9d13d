"""Interrupts on KVM's in-kernel irqchip: the PC's GSI routing, the 8259s' start-up mask, and irq lines."""

from __future__ import annotations

from vmm.kvm import uapi as k
from vmm.kvm.fd import VmFd
from vmm.layout import IOAPIC_PINS, PIC_CASCADE_IRQ, TIMER_IOAPIC_PIN, isa_irq_to_ioapic_pin


def pc_gsi_routing() -> list[tuple[int, int, int]]:
    """GSI -> (irqchip, pin) as on a PC and as our MADT describes it.

    ISA IRQs 0-15 reach the 8259 pair (except the cascade input) and the I/O
    APIC, IRQ 0 on pin 2 (vmm/layout.py). KVM's default routing sends GSI 0 to
    pin 0, where Linux, reading the MADT, never looks.
    """
    routes = []
    for gsi in range(16):
        if gsi != PIC_CASCADE_IRQ:
            chip = k.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else k.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, chip, gsi % 8))
    for gsi in range(IOAPIC_PINS):
        if gsi != TIMER_IOAPIC_PIN:  # that pin is the timer's IRQ 0
            routes.append((gsi, k.KVM_IRQCHIP_IOAPIC, isa_irq_to_ioapic_pin(gsi)))
    return routes


def mask_8259s(vm_fd: VmFd) -> None:
    """Mask every input of KVM's 8259 pair, as a PC's firmware leaves them.

    KVM creates the pair with nothing masked and vector base 0. A guest that
    never programs it (Linux on our hardware-reduced ACPI machine does not)
    would then get every ISA interrupt a second time through LINT0 (ExtINT,
    as firmware leaves it) as vector 0-15: the COM1 interrupt as #OF.
    A guest that wants the 8259s initialises them, which unmasks them.
    """
    for chip_id in (k.KVM_IRQCHIP_PIC_MASTER, k.KVM_IRQCHIP_PIC_SLAVE):
        chip = vm_fd.get_irqchip(chip_id)
        chip.chip.pic.imr = 0xFF
        vm_fd.set_irqchip(chip)


class KvmIrqLine:
    """An input pin of KVM's in-kernel 8259/IOAPIC pair."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi

    def set_level(self, high: bool) -> None:
        self._vm.irq_line(self.gsi, high)

    def pulse(self) -> None:
        self._vm.irq_line(self.gsi, True)
        self._vm.irq_line(self.gsi, False)
