"""Building one virtual machine, in the order a real machine comes up:

    memory -> accelerator and VM (with its interrupt controllers) -> devices
    -> ACPI tables and boot loader -> vCPUs

`build(machine)` fills in a `Machine` (vmm/machine.py), which runs it and,
whatever happened while building, releases what was built.
"""

from __future__ import annotations

from boot.firmware import (
    BootFailureWatch,
    add_boot_files,
    map_bios,
    plug_fw_cfg,
    read_bios,
    reset_vector_state,
)
from boot.kernel_params import add_unset_kernel_params, insert_kernel_params
from boot.reboot_params import add_reboot_params
from boot.reset_stub import install_reset_stub
from devices import (
    acpi_pm,
    boot_timer,
    debug_exit,
    i8042,
    legacy,
    pc_testdev,
    pvpanic,
    rtc,
    testdev,
    uart,
)
from devices.board import Board
from vmm import layout
from vmm.accel import PlatformOptions
from vmm.accel_select import open_accelerator
from vmm.bus import NullIrqLine
from vmm.config import DEFAULT_CMDLINE, MachineConfig
from vmm.cpu_state import CpuState
from vmm.errors import PyvmmError
from vmm.guest_reset import GuestResets
from vmm.machine import Machine
from vmm.memory import GuestMemory


def _always(config: MachineConfig) -> bool:
    return True


# The machine's devices: each name, the function in the device's own file that
# plugs it in (devices/board.py), and which machines have it. They are plugged
# in this order, which is also their order in the DSDT; the virtio devices
# (vmm/virtio_setup.py) come after them. Adding a device is its file plus one
# line here.
DEVICES = (
    ("com1", uart.plug, _always),
    ("rtc", rtc.plug, _always),
    ("i8042", i8042.plug, _always),
    ("pvpanic", pvpanic.plug, _always),
    ("boot-timer", boot_timer.plug, _always),
    ("acpi-pm", acpi_pm.plug, _always),
    ("debug-exit", debug_exit.plug, _always),
    ("fw_cfg", plug_fw_cfg, _always),
    ("legacy", legacy.plug, _always),
    # QEMU's pc-testdev, for kvm-unit-tests (`boot --test-devices`).
    ("pc-testdev", pc_testdev.plug, lambda config: config.test_devices),
    # A scratch MMIO page for the test guests `boot --flat` runs.
    ("scratch", testdev.plug, lambda config: config.flat is not None),
)


def build(machine: Machine) -> None:
    config = machine.config
    machine.memory = GuestMemory(config.memory)
    machine.resets = GuestResets(machine.stop, machine.memory)
    _install_firmware(machine)
    machine.accel, accel_notice = open_accelerator(config)
    machine.accel_name = machine.accel.name
    # Linux gets a PC's interrupt controllers and timer; a flat guest
    # gets none, so its HLT ends the run.
    platform = PlatformOptions(cpus=config.cpus, irqchip=config.is_linux, cpu_features=config.cpu_features,
                               cpu_vendor=config.cpu_vendor)
    machine.vm = machine.accel.create_vm(machine.memory, machine.io, platform)
    board = plug_devices(machine, platform.irqchip)
    if config.boots_firmware:
        boot_state = _load_firmware(machine, board)
    else:
        boot_state = _load_kernel(machine, board) if config.is_linux else _load_flat(machine)
    if accel_notice:
        machine.console.notice(accel_notice)
    for index in range(config.cpus):
        vcpu = machine.vm.create_vcpu(index)
        machine.vcpus.append(vcpu)
        machine.stop.add_kicker(vcpu.kick)
    # The other vCPUs wait for INIT/SIPI from the boot CPU, as on a PC.
    machine.vcpus[0].set_state(boot_state)
    if config.is_linux:  # only loading a kernel leaves decompression buffers behind
        from vmm.host_memory import release_freed_heap

        release_freed_heap()  # gone but still resident in the C heap
    if config.gdb is not None:
        from vmm.gdb.server import open_gdb_stub

        machine.gdb = open_gdb_stub(config.gdb, machine.vm, machine.vcpus, machine.memory, machine.stop)


def _install_firmware(machine: Machine) -> None:
    """What sits at the reset vector: the firmware for a disk boot (before the accelerator
    maps memory), else a stub that resets the machine."""
    if machine.config.boots_firmware:
        map_bios(machine.memory, read_bios(machine.config.bios))
    else:
        install_reset_stub(machine.memory)


def plug_devices(machine: Machine, irqchip: bool) -> Board:
    vm, stop, console, config = machine.vm, machine.stop, machine.console, machine.config
    if config.boots_firmware:
        # SeaBIOS says "No bootable device." on the serial port, then resets (Machine.run tells).
        machine.boot_failure = BootFailureWatch(console.write)
    board = machine.board = Board(
        pio=machine.io.pio, mmio=machine.io.mmio, memory=machine.memory, cpus=config.cpus,
        irq=(lambda gsi: vm.irq_line(gsi)) if irqchip else (lambda gsi: NullIrqLine()),
        stop=stop.request_stop, reset=machine.resets.reset, console_write=console.write,
        console_room_available=console.room_available, started=machine.started,
        serial_write=machine.boot_failure, console_interactive=console.interactive,
        console_notice=console.notice)
    for name, plug, wanted in DEVICES:
        if wanted(config):
            machine.devices[name] = plug(board)
    if machine.config.virtio.count:
        # Imported here, as the kernel loaders below: a machine loads only what it uses (start-up time).
        from vmm.virtio_setup import plug_virtio_devices

        machine.virtio = plug_virtio_devices(board, vm, machine.config.virtio, irqchip=irqchip,
                                             compiled_blk=machine.accel.compiled_blk_requests)
    return board


def _load_flat(machine: Machine) -> CpuState:
    image, memory = machine.config.flat, machine.memory
    try:
        data = image.read_bytes()
    except OSError as err:
        raise PyvmmError(f"cannot read {image}: {err.strerror}") from None
    room = min(memory.size, layout.MMIO_HOLE_START) - layout.FLAT_LOAD_ADDRESS
    if len(data) > room:
        raise PyvmmError(f"{image} ({len(data)} bytes) does not fit in guest memory above "
                         f"{layout.FLAT_LOAD_ADDRESS:#x}")
    memory.write(layout.FLAT_LOAD_ADDRESS, data)
    return CpuState.real_mode(layout.FLAT_ENTRY_CS, 0)


def kernel_cmdline(machine: Machine) -> str:
    config, virtio = machine.config, machine.virtio
    cmdline = config.cmdline if config.cmdline is not None else DEFAULT_CMDLINE
    cmdline = add_unset_kernel_params(cmdline, machine.accel.linux_cmdline_additions())
    if virtio is not None:
        if config.cmdline is None and virtio.console is not None:
            cmdline += " console=hvc0"  # the kernel's console follows the host terminal
        if config.virtio.cmdline_devices:
            cmdline = insert_kernel_params(cmdline, virtio.cmdline_fragments())
    return cmdline


def _load_firmware(machine: Machine, board: Board) -> CpuState:
    # The disks come first among the virtio devices: disk n has window n.
    disks, windows = machine.config.virtio.disks, machine.virtio.windows
    by_bootindex = sorted((d.bootindex, n) for n, d in enumerate(disks) if d.bootindex is not None)
    add_boot_files(machine.devices["fw_cfg"], machine.config.cpus, board.acpi,
                   boot_windows=[windows[n].base for _, n in by_bootindex])
    return reset_vector_state()


def _load_kernel(machine: Machine, board: Board) -> CpuState:
    """A multiboot kernel (by its header), else Linux; either way with the ACPI tables."""
    from boot.acpi import build_acpi_tables
    from boot.linux import load_linux
    from boot.multiboot_header import read_header

    config = machine.config
    rsdp = build_acpi_tables(machine.memory, config.cpus, board.acpi)
    header = read_header(config.kernel)  # from the first 8 KiB: a Linux kernel is not read whole here
    if header is not None:
        # The loader and the BIOS state it sets up, imported for multiboot kernels only.
        from boot.multiboot import load_multiboot

        modules = [config.initrd] if config.initrd is not None else []
        return load_multiboot(machine.memory, config.kernel, header, config.cmdline or "", modules)
    params = add_reboot_params(kernel_cmdline(machine))
    machine.resets.warm_reset_means_panic = params.warm_reset_means_panic
    return load_linux(machine.memory, config.kernel, config.initrd, params.cmdline, rsdp,
                      direct=not config.guest_decompress)
