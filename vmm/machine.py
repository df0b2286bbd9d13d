"""Building and running one virtual machine, in the order a real machine comes up:

    memory -> accelerator and VM (with its interrupt controllers) -> devices
    -> ACPI tables and boot loader -> vCPUs -> run -> shutdown

`run_machine()` returns the process exit status (vmm/exit_status.py).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

from boot.acpi import build_acpi_tables
from boot.firmware import (
    BootFailureWatch,
    add_boot_files,
    add_machine_facts,
    map_bios,
    read_bios,
    reset_vector_state,
)
from boot.linux import load_linux
from boot.multiboot import load_multiboot
from boot.reboot_params import add_reboot_params
from boot.reset_stub import install_reset_stub
from devices.acpi_pm import AcpiPowerManagement
from devices.boot_timer import BootTimer, process_start_time
from devices.debug_exit import DebugExit
from devices.fw_cfg import PORT_COUNT as FW_CFG_PORT_COUNT
from devices.fw_cfg import FwCfg
from devices.i8042 import I8042
from devices.legacy import SilentDevice, register_legacy_ports
from devices.pc_testdev import register_pc_testdev
from devices.pvpanic import PvPanic
from devices.rtc import CmosRtc
from devices.testdev import TEST_DEVICE_SIZE, ScratchDevice
from devices.uart import Uart16550
from vmm import exit_status, layout
from vmm.accel import MachineIo, PlatformOptions
from vmm.accel_select import open_accelerator
from vmm.bus import Bus, NullIrqLine
from vmm.config import DEFAULT_CMDLINE, MachineConfig
from vmm.console import Console
from vmm.cpu_state import CpuState
from vmm.errors import PyvmmError
from vmm.guest_reset import GuestResets
from vmm.host_memory import release_freed_heap
from vmm.lifecycle import StopController
from vmm.memory import GuestMemory
from vmm.stuck_vcpu import LOOK_INTERVAL, StuckVcpuWatch
from vmm.vcpu_thread import VcpuThread
from vmm.virtio_setup import VirtioDevices, add_virtio_devices

log = logging.getLogger(__name__)

# How long shutdown waits for a kicked vCPU thread before giving up on it.
VCPU_JOIN_TIMEOUT = 5.0
# How long the vCPUs get to finish writing console output before it is dropped.
OUTPUT_GRACE_SECONDS = 1.0


class Machine:
    def __init__(self, config: MachineConfig, console: Console) -> None:
        config.validate()
        self.config = config
        self.console = console
        self.started = process_start_time()
        self.stop = StopController()
        self.io = MachineIo(pio=Bus("pio"), mmio=Bus("mmio"))
        self.threads: list[VcpuThread] = []
        self.memory: GuestMemory | None = None
        self.accel = None
        self.vm = None
        self.vcpus = []
        self.userspace_reached: float | None = None
        self.virtio: VirtioDevices | None = None
        self.boot_failure: BootFailureWatch | None = None  # booting a disk: the firmware's serial output
        self.accel_name = "none"
        self.gdb = None  # vmm.gdb.server.GdbServer with --gdb
        self.stuck_watch = StuckVcpuWatch(self._notice)

    # -- building ------------------------------------------------------------

    def build(self) -> None:
        config = self.config
        self.memory = GuestMemory(config.memory)
        self.resets = GuestResets(self.stop, self.memory)
        self._install_firmware()
        self.accel, accel_notice = open_accelerator(config)
        self.accel_name = self.accel.name
        # Linux gets a PC's interrupt controllers and timer; a flat guest
        # gets none, so its HLT ends the run.
        platform = PlatformOptions(cpus=config.cpus, irqchip=config.is_linux,
                                   cpu_features=config.cpu_features)
        self.vm = self.accel.create_vm(self.memory, self.io, platform)
        self._add_devices(platform.irqchip)
        if config.boots_firmware:
            boot_state = self._load_firmware()
        else:
            boot_state = self._load_kernel() if config.is_linux else self._load_flat()
        if accel_notice:
            self.console.notice(accel_notice)
        for index in range(config.cpus):
            vcpu = self.vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            self.stop.add_kicker(vcpu.kick)
        # The other vCPUs wait for INIT/SIPI from the boot CPU, as on a PC.
        self.vcpus[0].set_state(boot_state)
        release_freed_heap()  # the kernel's decompression buffers, gone but still resident
        if config.gdb is not None:
            from vmm.gdb.server import open_gdb_stub

            self.gdb = open_gdb_stub(config.gdb, self.vm, self.vcpus, self.memory, self.stop)

    def _install_firmware(self) -> None:
        """What sits at the reset vector: the firmware for a disk boot (before the accelerator
        maps memory), else a stub that resets the machine."""
        if self.config.boots_firmware:
            map_bios(self.memory, read_bios(self.config.bios))
        else:
            install_reset_stub(self.memory)

    def _add_devices(self, irqchip: bool) -> None:
        pio, stop, resets = self.io.pio, self.stop, self.resets

        def irq(gsi: int):
            return self.vm.irq_line(gsi) if irqchip else NullIrqLine()

        # SeaBIOS says "No bootable device." on the serial port, then resets (run() tells).
        if self.config.boots_firmware:
            self.boot_failure = BootFailureWatch(self.console.write)
        self.uart = Uart16550(irq(layout.COM1_IRQ), self.boot_failure or self.console.write,
                              room_available=self.console.room_available)
        pio.register(layout.COM1_PORT, 8, self.uart, "com1")
        i8042 = I8042(lambda: resets.reset("the i8042's reset line"),
                      kbd_irq=irq(layout.I8042_KEYBOARD_IRQ), aux_irq=irq(layout.I8042_AUX_IRQ))
        pio.register(layout.I8042_DATA_PORT, 1, i8042.data_port, "i8042-data")
        pio.register(layout.I8042_COMMAND_PORT, 1, i8042.command_port, "i8042-cmd")
        low_ram = sum(r.size for r in self.memory.regions if r.guest_address < layout.MMIO_HOLE_START)
        pio.register(layout.RTC_PORT, 2, CmosRtc(low_memory=low_ram, high_memory=self.memory.size - low_ram),
                     "rtc")
        pio.register(layout.PVPANIC_PORT, 1, PvPanic(
            lambda: stop.request_stop(exit_status.GUEST_PANIC, "the guest kernel panicked")), "pvpanic")
        pio.register(layout.BOOT_TIMER_PORT, 1, BootTimer(self.started, on_mark=self._userspace_reached),
                     "boot-timer")
        pio.register(layout.ACPI_SLEEP_CONTROL_PORT, 3, AcpiPowerManagement(
            power_off=lambda: stop.request_stop(exit_status.POWEROFF, ""),
            reset=lambda: resets.reset("the ACPI reset register")), "acpi-pm")
        pio.register(layout.DEBUG_EXIT_PORT, 1, DebugExit(self._debug_exit), "debug-exit")
        pio.register(layout.POST_CODE_PORT, 1, SilentDevice(), "post-code")
        self.fw_cfg = FwCfg(self.memory)
        add_machine_facts(self.fw_cfg, self.memory.size, self.config.cpus)
        pio.register(layout.FW_CFG_PORT, FW_CFG_PORT_COUNT, self.fw_cfg, "fw_cfg")
        register_legacy_ports(pio, lambda: resets.reset("a chipset reset register, port 0x92 or 0xcf9"))
        if self.config.virtio.count:
            self.virtio = add_virtio_devices(self.io, self.memory, self.vm, self.config.virtio, irqchip=irqchip,
                                             console_writer=self.console.write,
                                             console_room_available=self.console.room_available)
        if self.config.test_devices:
            register_pc_testdev(pio, self.io.mmio, irq)
        if self.config.flat is not None:
            self.io.mmio.register(layout.TEST_DEVICE_BASE, TEST_DEVICE_SIZE, ScratchDevice(), "scratch")

    def _debug_exit(self, status: int) -> None:
        self.stop.request_stop(status, "")

    def _userspace_reached(self, seconds: float) -> None:
        self.userspace_reached = seconds

    def _load_flat(self) -> CpuState:
        image = self.config.flat
        try:
            data = image.read_bytes()
        except OSError as err:
            raise PyvmmError(f"cannot read {image}: {err.strerror}") from None
        room = min(self.memory.size, layout.MMIO_HOLE_START) - layout.FLAT_LOAD_ADDRESS
        if len(data) > room:
            raise PyvmmError(f"{image} ({len(data)} bytes) does not fit in guest memory above "
                             f"{layout.FLAT_LOAD_ADDRESS:#x}")
        self.memory.write(layout.FLAT_LOAD_ADDRESS, data)
        return CpuState.real_mode(layout.FLAT_ENTRY_CS, 0)

    def kernel_cmdline(self) -> str:
        cmdline = self.config.cmdline if self.config.cmdline is not None else DEFAULT_CMDLINE
        additions = [p for p in self.accel.linux_cmdline_additions() if p not in cmdline.split()]
        cmdline = " ".join([cmdline, *additions]).strip()
        if self.virtio is not None:
            if self.config.cmdline is None and self.virtio.console is not None:
                cmdline += " console=hvc0"  # the kernel's console follows the host terminal
            if self.config.virtio.cmdline_devices:
                cmdline = " ".join([cmdline, *self.virtio.cmdline_fragments()])
        return cmdline

    def _load_firmware(self) -> CpuState:
        # The disks come first among the virtio devices: disk n has window n.
        disks = self.config.virtio.disks
        by_bootindex = sorted((d.bootindex, n) for n, d in enumerate(disks) if d.bootindex is not None)
        add_boot_files(self.fw_cfg, self.config.cpus, self.virtio.windows,
                       boot_windows=[self.virtio.windows[n].base for _, n in by_bootindex])
        return reset_vector_state()

    def _load_kernel(self) -> CpuState:
        """A multiboot kernel (by its header), else Linux; either way with the ACPI tables."""
        config = self.config
        rsdp = build_acpi_tables(self.memory, config.cpus,
                                 virtio_devices=self.virtio.windows if self.virtio else ())
        modules = [config.initrd] if config.initrd is not None else []
        state = load_multiboot(self.memory, config.kernel, config.cmdline or "", modules)
        if state is not None:
            return state
        params = add_reboot_params(self.kernel_cmdline())
        self.resets.warm_reset_means_panic = params.warm_reset_means_panic
        return load_linux(self.memory, config.kernel, config.initrd, params.cmdline, rsdp,
                          direct=not config.guest_decompress)

    # -- running -------------------------------------------------------------

    def run(self) -> int:
        virtio_console = self.virtio.console if self.virtio else None
        self.console.start(virtio_console.receive if virtio_console else self.uart.receive)
        if self.virtio:
            self.virtio.start()
        if self.gdb is not None:
            self.gdb.start()
        for vcpu in self.vcpus:
            thread = VcpuThread(vcpu, self.io, self.stop, self.gdb.debugger if self.gdb else None,
                                triple_fault=self.resets.triple_fault)
            self.threads.append(thread)
            thread.start()
        self._wait_for_stop()
        if (self.boot_failure is not None and self.boot_failure.seen
                and self.stop.status in (exit_status.RESET, exit_status.TRIPLE_FAULT)):
            # The reset that follows the message (port 0xCF9; a triple fault is SeaBIOS's fallback).
            self.stop.status = exit_status.NO_BOOTABLE_DEVICE
            self.stop.reason = "the firmware found no bootable device"
        return self.stop.status

    def _wait_for_stop(self) -> None:
        """Until the machine stops or --timeout runs out; meanwhile each vCPU looks
        once a second whether it is stuck (vmm/stuck_vcpu.py)."""
        timeout = self.config.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = self.stuck_watch
        while True:
            wait = LOOK_INTERVAL if deadline is None else min(LOOK_INTERVAL, deadline - time.monotonic())
            if self.stop.wait(max(wait, 0.0)):
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.stop.request_stop(exit_status.TIMED_OUT, f"the guest was still running after --timeout "
                                                              f"{timeout:g} s; stopped it")
                return
            for thread in self.threads:
                thread.request_look(watch.look)

    def _notice(self, message: str) -> None:
        """One line while the guest runs: on stderr, or where the console sends notices."""
        self.console.notice(message)

    def shutdown(self) -> None:
        """Stop every vCPU thread and release host resources; safe to call more than once."""
        self.stop.request_stop(exit_status.INTERRUPTED, "stopped")
        deadline = time.monotonic() + VCPU_JOIN_TIMEOUT
        for thread in self.threads:
            thread.join(min(OUTPUT_GRACE_SECONDS, max(0.0, deadline - time.monotonic())))
        if any(thread.is_alive() for thread in self.threads):
            # A vCPU may be blocked writing console output nobody reads (a full
            # pipe): drop the output so that it can see the stop.
            self.console.discard_output()
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not stop within %.0f s", thread.name, VCPU_JOIN_TIMEOUT)
        self.console.stop()
        if self.virtio is not None and not any(thread.is_alive() for thread in self.threads):
            self.virtio.close()  # flushes the disks
        if self.gdb is not None:
            self.gdb.close()
            self.gdb = None
        if any(thread.is_alive() for thread in self.threads):
            return  # a stuck thread may still use the VM and memory; the process exit frees them
        if self.stop.status == exit_status.TIMED_OUT:
            for vcpu in self.vcpus:  # a guest that ran out of time: was it stuck somewhere?
                self.stuck_watch.look(vcpu)
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.accel is not None:
            self.accel.close()
            self.accel = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # -- reporting -----------------------------------------------------------

    def stats_report(self, wall_time: float) -> str:
        lines = [f"pyvmm stats: {wall_time:.3f} s wall time, accelerator {self.accel_name}"]
        if self.userspace_reached is not None:
            lines.append(f"  boot timer: userspace reached {self.userspace_reached:.3f} s after pyvmm started")
        exits = Counter()
        for thread in self.threads:
            exits.update(thread.exit_counts)
            exits.update(thread.vcpu.dispatched_io_counts())
        lines.append("  exits: " + (", ".join(f"{name} {n}" for name, n in exits.most_common()) or "none"))
        if self.virtio:
            lines.extend(self.virtio.stats_lines())
        for bus in (self.io.pio, self.io.mmio):
            for entry in bus.ranges:
                if entry.accesses:
                    lines.append(f"  {bus.name} {entry.name:<12} {entry.base:#x}+{entry.size:#x}: "
                                 f"{entry.accesses} accesses")
            if bus.unclaimed:
                shown = ", ".join(f"{addr:#x} ({n})" for addr, n in sorted(bus.unclaimed.items())[:16])
                lines.append(f"  {bus.name} unclaimed: {shown}")
        return "\n".join(lines)


_current: Machine | None = None


def current_machine() -> Machine | None:
    """The machine being run, for signal handlers."""
    return _current


def run_machine(config: MachineConfig) -> int:
    """Build, run and tear down one machine; returns the exit status."""
    status, reason = run_machine_quietly(config)
    if reason:
        print(f"pyvmm: {reason}", file=sys.stderr)
    return status


def run_machine_quietly(config: MachineConfig, console: Console | None = None) -> tuple[int, str]:
    """The same, printing nothing of its own (but --stats); returns (status, why it stopped).

    `console`: where the serial port goes (default: this terminal or pipe).
    """
    global _current
    started = time.monotonic()
    console = console or Console(quit=lambda: _current and _current.stop.request_stop(
        exit_status.INTERRUPTED, "stopped by Ctrl-A x"))
    machine = _current = Machine(config, console)
    try:
        machine.build()
        status = machine.run()
        reason = machine.stop.reason
    finally:
        machine.shutdown()
        console.restore()
        _current = None
    if config.stats:
        print(machine.stats_report(time.monotonic() - started), file=sys.stderr)
    return status, reason
