"""The `pyvmm` command line.

Every failure the user can act on arrives here as a `PyvmmError` and leaves
as one line on stderr with a non-zero status; nothing else is printed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import click

from vmm import exit_status
from vmm.accel_select import ACCELERATORS
from vmm.config import DEFAULT_CMDLINE, MachineConfig, parse_memory_size
from vmm.cpu_features import CPU_VENDORS, parse_feature_edits
from vmm.errors import PyvmmError, report
from vmm.gdb.options import gdb_options, gdb_spec
from vmm.host_output import reserve_standard_fds, use_standard_streams
from vmm.host_signals import handling
from vmm.virtio_options import DiskSpec, VirtioSpecs, parse_console, parse_disk, parse_fs, parse_net


def fail(message: str, status: int = exit_status.ERROR) -> None:
    report(message)
    sys.exit(status)


class _Commands(click.Group):
    """The top-level commands; `img` (the whole image library) is imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "img"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "img":
            from vmm.image.cli import img

            return img
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyvmm")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """pyvmm: boot a kernel in a KVM virtual machine (or on a software CPU)."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="pyvmm: %(name)s: %(message)s")


@cli.command()
@click.option("--kernel", "-k", type=click.Path(path_type=Path, dir_okay=False),
              help="Linux kernel: a bzImage or an ELF vmlinux.")
@click.option("--initrd", "-i", type=click.Path(path_type=Path, dir_okay=False), help="Initial ramdisk.")
@click.option("--cmdline", "-c", help=f"Kernel command line [default: {DEFAULT_CMDLINE}].")
@click.option("--flat", "flat", type=click.Path(path_type=Path, dir_okay=False),
              help="Raw binary loaded at 0x10000 and entered in real mode at 1000:0000.")
@click.option("--memory", "-m", default="512M", show_default=True, help="Guest RAM (K, M, G suffixes).")
@click.option("--cpus", default=1, show_default=True, type=int, help="Number of vCPUs.")
@click.option("--accel", type=click.Choice(ACCELERATORS), default="auto", show_default=True,
              help="CPU accelerator: KVM, the software CPU (tcg), or KVM when it can run the guest.")
@click.option("--cpu-features", default="", metavar="[+-]FEATURE,...",
              help="Add or remove CPUID features, e.g. -avx,+x2apic.")
@click.option("--cpu-vendor", type=click.Choice(CPU_VENDORS),
              help="The software CPU's vendor: intel (the default) or amd; implies the software CPU.")
@click.option("--guest-decompress", is_flag=True,
              help="Let a bzImage decompress itself in the guest instead of on the host.")
@click.option("--test-devices", is_flag=True,
              help="QEMU's pc-testdev (ports 0xe0-0xeb, IRQ lines at 0x2000, memory at 0xff000000), "
                   "for kvm-unit-tests.")
@click.option("--stats", is_flag=True, help="Print exit, device and boot-time figures when the VM stops.")
@click.option("--disk", "disks", multiple=True, metavar="PATH[,format=raw|qcow2][,readonly=on][,serial=ID]",
              help="A virtio-blk disk (repeatable).")
@click.option("--net", "nets", multiple=True, metavar="tap=NAME|socket=listen:PATH|socket=connect:PATH[,mac=MAC]",
              help="A virtio-net NIC on a TAP device or a unix socket to another pyvmm (repeatable).")
@click.option("--console", "console_kind", default="serial", show_default=True, metavar="serial|virtio",
              help="Connect the terminal to the serial port (ttyS0) or to virtio-console (hvc0).")
@click.option("--rng", is_flag=True, help="A virtio-rng device fed from the host's random source.")
@click.option("--fs", "filesystems", multiple=True, metavar="DIR,tag=TAG[,readonly=on]",
              help="Share a host directory over virtio-fs (repeatable); the guest mounts TAG.")
@click.option("--bios", type=click.Path(path_type=Path, dir_okay=False),
              help="Firmware for a disk boot [default: Debian's /usr/share/seabios/bios-microvm.bin].")
@click.option("--format", "disk_format", type=click.Choice(["raw", "qcow2"]),
              help="Format of DISK [default: probed].")
@click.option("--cdrom", type=click.Path(path_type=Path, dir_okay=False),
              help="An ISO image, attached read-only after DISK; firmware boots isohybrid ISOs.")
@click.argument("disk", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--virtio-cmdline", is_flag=True,
              help="Also list the virtio devices as virtio_mmio.device= kernel parameters "
                   "(for kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and no ACPI).")
@click.option("--timeout", type=float, metavar="SECONDS",
              help="Stop the guest after SECONDS and exit with status 124, as timeout(1) does.")
@gdb_options
def boot(kernel: Path | None, initrd: Path | None, cmdline: str | None, flat: Path | None, memory: str,
         cpus: int, accel: str, cpu_features: str, cpu_vendor: str | None, guest_decompress: bool, stats: bool,
         disks: tuple[str, ...], nets: tuple[str, ...], console_kind: str, rng: bool,
         bios: Path | None, disk_format: str | None, cdrom: Path | None, disk: Path | None,
         virtio_cmdline: bool, timeout: float | None, gdb: str | None, gdb_default: bool, paused: bool,
         test_devices: bool,
         filesystems: tuple[str, ...]) -> None:
    """Boot DISK through firmware, or a kernel (--kernel) or flat image (--flat) directly;
    exits with the guest's status (see the README)."""
    from vmm.session import run_machine

    try:
        config = MachineConfig(
            memory=parse_memory_size(memory), cpus=cpus, accel=accel, flat=flat,
            kernel=kernel, initrd=initrd, cmdline=cmdline, guest_decompress=guest_decompress, bios=bios,
            cpu_features=parse_feature_edits(cpu_features), cpu_vendor=cpu_vendor, stats=stats, timeout=timeout,
            test_devices=test_devices,
            virtio=VirtioSpecs(disks=boot_disks(disk, disk_format, cdrom) + [parse_disk(d) for d in disks],
                               nets=[parse_net(n) for n in nets],
                               console=parse_console(console_kind), rng=rng, cmdline_devices=virtio_cmdline,
                               filesystems=[parse_fs(f) for f in filesystems]),
            gdb=gdb_spec(gdb, gdb_default, paused))
        with _stop_on_signals():
            status = run_machine(config)
    except PyvmmError as err:
        fail(str(err), err.exit_status)
    _exit_now(status)


def _exit_now(status: int) -> None:
    """Exit without the interpreter's teardown of every module and object.

    The machine has been shut down and its disks flushed; what is left is
    memory the kernel frees faster than Python's finalizer walks it (a tenth
    of a second on a small guest, longer than the guest itself ran). sys.stdout
    and sys.stderr hold nothing back to flush (host_output.use_standard_streams).
    """
    logging.shutdown()
    os._exit(status)


def boot_disks(disk: Path | None, disk_format: str | None, cdrom: Path | None) -> list[DiskSpec]:
    """DISK and --cdrom, the first virtio-blk disks (vda, vdb). The firmware boots the ISO
    first, as QEMU's `-boot d` would: the installer workflow, with DISK still vda."""
    if disk_format is not None and disk is None:
        raise PyvmmError("--format describes DISK, and no DISK was given")
    specs = []
    for option, path in (("DISK", disk), ("--cdrom", cdrom)):
        if path is not None and not path.is_file():
            raise PyvmmError(f"{option} {path}: no such file")
    if disk is not None:
        specs.append(DiskSpec(str(disk), disk_format, bootindex=1))
    if cdrom is not None:
        specs.append(DiskSpec(str(cdrom), "raw", readonly=True, bootindex=0))
    return specs


def _stop_on_signals():
    """SIGINT/SIGTERM/SIGHUP become an orderly stop: the machine shuts down, then pyvmm exits 130."""
    return handling((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), _stop_machine)


def _stop_machine(signum, frame):
    from vmm.session import host_stops_current

    host_stops_current(exit_status.INTERRUPTED, f"stopped by {signal.Signals(signum).name}")


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("--kernel", "-k", type=click.Path(path_type=Path, dir_okay=False),
              help="Linux kernel [default: /boot/vmlinuz-$(uname -r)].")
@click.option("--modules", type=click.Path(path_type=Path, file_okay=False),
              help="The kernel's module tree [default: /lib/modules/<its version>].")
@click.option("--cpus", default=1, show_default=True, type=int, help="Number of vCPUs.")
@click.option("--memory", "-m", default="512M", show_default=True, help="Guest RAM (K, M, G suffixes).")
@click.option("--accel", type=click.Choice(ACCELERATORS), default="auto", show_default=True,
              help="CPU accelerator.")
@click.option("--rw", "writable", multiple=True, metavar="DIR",
              help="Share DIR writable at the same path (repeatable); everything else is read-only.")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="Set a variable for the command (repeatable).")
@click.option("--timeout", type=float, metavar="SECONDS",
              help="Stop the guest after SECONDS and exit with status 124, as timeout(1) does.")
@gdb_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, kernel: Path | None, modules: Path | None, cpus: int, memory: str, accel: str,
        writable: tuple[str, ...], env: tuple[str, ...], timeout: float | None, gdb: str | None,
        gdb_default: bool, paused: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND in a fresh kernel that sees this host's files; exits with its status.

    Without a command, an interactive shell. 124: --timeout expired; 125: the
    guest could not run the command; 126/127: not executable / not found.
    """
    from vmm.run.runner import CANNOT_RUN, RunOptions, run_command

    verbose = ctx.find_root().params.get("verbose", 0) > 0
    try:
        options = RunOptions(command=list(command), kernel=kernel, modules=modules, cpus=cpus,
                             memory=parse_memory_size(memory), accel=accel, writable=list(writable),
                             env=list(env), timeout=timeout, verbose=verbose,
                             gdb=gdb_spec(gdb, gdb_default, paused))
        with _stop_on_signals():
            status = run_command(options)
    except PyvmmError as err:
        fail(str(err), CANNOT_RUN)
    _exit_now(status)


@cli.command()
def check() -> None:
    """Report what this host offers pyvmm."""
    from vmm.host_check import report

    ok = report(click.echo)
    sys.exit(0 if ok else exit_status.ERROR)


def main() -> None:
    reserve_standard_fds()
    use_standard_streams()
    try:
        cli(prog_name="pyvmm")
    except PyvmmError as err:  # what a command printed had nowhere to go (`pyvmm check | head -1`)
        fail(str(err), err.exit_status)
