"""The guest-physical memory map and the PC's interrupt wiring, in one place.

Devices' ports and windows are not here: each device file says where it sits
(devices/board.py).
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# RAM below 4 GiB stops here; the rest of guest RAM continues at 4 GiB. The
# gap holds MMIO: virtio-mmio windows from its start (devices/virtio/mmio.py),
# the I/O APIC and the local APIC.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
HIGH_RAM_START = MMIO_HOLE_END

# The interrupt controllers sit where the MADT says (and KVM puts its own).
IOAPIC_BASE = 0xFEC0_0000
# A PC's firmware flash ends at 4 GiB: the CPU leaves reset at 0xFFFFFFF0
# (CS base 0xFFFF0000, IP 0xFFF0). Firmware copied below 1 MiB answers at
# F000:FFF0 = 0xFFFF0, where real-mode code (Linux's reboot=bios) jumps.
FIRMWARE_AREA_END = 0x1_0000_0000
RESET_VECTOR = 0xFFFF_FFF0
REAL_MODE_RESET_VECTOR = 0xF_FFF0
LAPIC_BASE = 0xFEE0_0000

# -- Interrupt wiring, as on a PC --------------------------------------------------
IOAPIC_PINS = 24  # GSIs 0-23: ISA IRQs 0-15, then the virtio-mmio devices
PIC_CASCADE_IRQ = 2  # the master 8259 input that the slave's output drives
# ISA IRQ n reaches I/O APIC pin n, except the PIT's IRQ 0, which reaches pin 2 (pin 0
# carries the 8259s' output): the MADT's one interrupt source override. KVM's GSI
# routing (vmm/kvm) and the software CPU's router (devices/interrupts.py) follow it.
TIMER_IRQ = 0
TIMER_IOAPIC_PIN = 2


def isa_irq_to_ioapic_pin(irq: int) -> int:
    return TIMER_IOAPIC_PIN if irq == TIMER_IRQ else irq


# `boot --flat`: a raw image is loaded here and entered at CS:IP = 0x1000:0000.
FLAT_LOAD_ADDRESS = 0x10000
FLAT_ENTRY_CS = 0x1000

# Addresses KVM needs for its own use on Intel hosts (three pages for the TSS,
# one for the EPT identity map), placed just below the BIOS ROM area at the top
# of the 32-bit space, where no RAM or device lives.
KVM_TSS_ADDRESS = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000

# -- Linux boot (boot/): structures the loader writes below 1 MiB ----------------
# The same low-memory places Firecracker uses, all below the EBDA and clear of
# the real-mode IVT/BDA (0-0x4ff).
BOOT_GDT_ADDRESS = 0x500
ZERO_PAGE_ADDRESS = 0x7000  # struct boot_params, handed to the kernel in RSI
BOOT_STACK_POINTER = 0x8FF0
BOOT_PML4_ADDRESS = 0x9000
BOOT_PDPT_ADDRESS = 0xA000
BOOT_PD_ADDRESS = 0xB000  # four page directories (0xB000-0xEFFF) map the first 4 GiB
# A multiboot kernel's information structure, memory map, module list and
# strings (boot/multiboot.py), between the GDT and where a zero page would be.
MULTIBOOT_INFO_ADDRESS = 0x1000
MULTIBOOT_INFO_SIZE = 0x6000
CMDLINE_ADDRESS = 0x20000
CMDLINE_MAX_SIZE = 0x10000  # room reserved for the command line, NUL included
# From the EBDA up to 1 MiB (EBDA, VGA hole, option ROMs, BIOS) real firmware
# reports reserved; so does pyvmm, and the ACPI tables live in that area.
EBDA_START = 0x9FC00
HIGH_MEMORY_START = 0x10_0000
# The RSDP sits at the bottom of the BIOS area so the kernel's legacy scan of
# 0xE0000-0xFFFFF finds it; the other ACPI tables follow it, below 1 MiB.
ACPI_RSDP_ADDRESS = 0xE_0000
ACPI_TABLES_END = 0xF_E000
# A multiboot kernel's BIOS interrupt handlers and entry stub (boot/bios_state.py),
# F000:E000; the last page holds the reset vector (boot/reset_stub.py).
BIOS_CODE_ADDRESS = 0xF_E000
# The real-mode interrupt vector table and the BIOS data area.
IVT_AND_BDA_END = 0x500
# Hardware-reduced ACPI registers, in port I/O space (described by the FADT).
# Power-off: the guest writes (ACPI_SLP_TYP_S5 << 2) | ACPI_SLEEP_CONTROL_SLP_EN
# = 0x34 to the sleep control register. Reboot: ACPI_RESET_VALUE to the reset register.
ACPI_SLEEP_CONTROL_PORT = 0x600
ACPI_SLEEP_STATUS_PORT = 0x601
ACPI_RESET_PORT = 0x602
ACPI_RESET_VALUE = 0x42
ACPI_SLP_TYP_S5 = 5  # the value _S5 in the DSDT tells the guest to write into SLP_TYP
ACPI_SLEEP_CONTROL_SLP_TYP_SHIFT = 2  # SLP_TYP is bits 2-4 of the sleep control register
ACPI_SLEEP_CONTROL_SLP_EN = 1 << 5
# The ACPI PM timer's 32-bit register (devices/acpi_pm.py), where QEMU's q35 chipset has it.
ACPI_PM_TIMER_PORT = 0x608
