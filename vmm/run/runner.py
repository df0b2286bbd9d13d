"""`pyvmm run`: one command in a fresh kernel, with the host's files, its output and its status.

The guest sees the host's / read-only (virtio-fs, enforced by pyvmm's
server), its own /proc, /sys, /dev and fresh tmpfs on /tmp, /run, /var/tmp,
/dev/shm, and each --rw directory writable at the same path. A working
directory that those tmpfs hide and no --rw shows is shared read-only at
its path (vmm/run/initramfs.py). /init (built for this run)
mounts all that and execs the host's /bin/sh with a short script that enters
the host's working directory, runs the command with the stdio share
(vmm/run/stdio_share.py) as its stdin, stdout and stderr, and writes its exit
status there, which ends the run.

The serial console carries only the kernel's log: to a file in the run's
scratch directory, or to stderr with -v. Exit statuses: the command's own;
124 when --timeout expired; 141 when pyvmm's stdout or stderr was closed
(its reader exited); 125 when the guest could not run it (one line on
stderr says why); the shell's 126/127 when it is not executable or not found.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from devices.virtio.fs import VirtioFs
from devices.virtio.mmio import MAX_DEVICES as VIRTIO_MMIO_MAX_DEVICES
from vmm import exit_status
from vmm.config import MachineConfig
from vmm.console import Console
from vmm.errors import PyvmmError, report
from vmm.gdb.options import GdbSpec
from vmm.run.initramfs import (
    PRIVATE_DIRECTORIES,
    ROOT_TAG,
    STDIO_DIR,
    STDIO_TAG,
    WORKDIR_TAG,
    GuestPlan,
    build_initramfs,
    hidden_working_directory,
)
from vmm.run.modules import default_kernel, guest_modules, kernel_release
from vmm.run.stdio_share import StdioShare
from vmm.session import current_machine, host_stops_current, run_machine_quietly, stop_current
from vmm.virtio_options import FsSpec, VirtioSpecs

CANNOT_RUN = 125

# The guest's kernel log goes to the serial port; `quiet` keeps it short.
CMDLINE = "console=ttyS0 reboot=acpi panic=-1 quiet"
# Host variables that name things of the host's session the guest cannot reach.
_HOST_ONLY_VARIABLES = {"SSH_AUTH_SOCK", "SSH_AGENT_PID", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR",
                        "DISPLAY", "WAYLAND_DISPLAY", "SHLVL", "OLDPWD", "PWD", "_"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Run by the host's /bin/sh as the guest's init: $1 is the working directory,
# the rest the command. The command runs in a subshell, so that even a
# builtin like `exit` leaves this shell to report its status. Readahead of
# 1 MiB (the largest FUSE READ, not the kernel's 128 KiB): a sequential read
# through virtio-fs then costs an eighth of the requests (8x the throughput
# measured on the software CPU).
_PROLOGUE = f"""for f in /sys/class/bdi/*/read_ahead_kb; do echo 1024 >"$f"; done 2>/dev/null
exec <{STDIO_DIR}/stdin >{STDIO_DIR}/stdout 2>{STDIO_DIR}/stderr
cd -- "$1" 2>/dev/null || {{ echo "pyvmm: cannot enter $1 in the guest" >&2; echo {CANNOT_RUN} >{STDIO_DIR}/status; exit; }}
shift
"""
SCRIPT = _PROLOGUE + f"""("$@")
echo $? >{STDIO_DIR}/status
"""
# With no command on a terminal: the shell gets hvc0 (virtio-console, joined to
# the host's terminal) as its controlling terminal, sized like the host's.
TERMINAL_SCRIPT = _PROLOGUE + f"""stty rows "$PYVMM_ROWS" cols "$PYVMM_COLS" </dev/hvc0 2>/dev/null
unset PYVMM_ROWS PYVMM_COLS
if command -v setsid >/dev/null; then setsid -c "$@" </dev/hvc0 >/dev/hvc0 2>&1; else ("$@") </dev/hvc0 >/dev/hvc0 2>&1; fi
echo $? >{STDIO_DIR}/status
"""
# The host's processes, kernel and devices, not its files: the guest mounts its own
# over these, and one that unmounts them finds them empty.
HIDDEN = ("/proc", "/sys", "/dev")
# virtio-mmio slots left for --rw once the root, the stdio share and a terminal have theirs.
MAX_WRITABLE = VIRTIO_MMIO_MAX_DEVICES - 3


@dataclass
class RunOptions:
    command: list[str]
    kernel: Path | None = None
    modules: Path | None = None
    cpus: int = 1
    memory: int = 512 << 20
    accel: str = "auto"
    writable: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    timeout: float | None = None
    verbose: bool = False
    gdb: GdbSpec | None = None  # --gdb/-s/-S, as on pyvmm boot


def guest_environment(extra: list[str], cwd: str) -> list[bytes]:
    """The host's environment as far as it makes sense in the guest, then --env NAME=VALUE."""
    env = {name: value for name, value in os.environb.items()
           if _NAME.fullmatch(name.decode(errors="replace")) and name.decode() not in _HOST_ONLY_VARIABLES}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep or not _NAME.fullmatch(name):
            raise PyvmmError(f"--env {item}: expected NAME=VALUE")
        env[name.encode()] = os.fsencode(value)
    env[b"PWD"] = os.fsencode(cwd)
    env.setdefault(b"PATH", b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return [name + b"=" + value for name, value in env.items()]


def _writable_shares(directories: list[str], workdir: bool) -> list[tuple[str, str]]:
    """The --rw shares; `workdir`: the working directory takes a slot of its own."""
    if len(directories) > MAX_WRITABLE - workdir:
        also = " beside the working directory" if workdir else ""
        raise PyvmmError(f"{len(directories)} --rw directories; pyvmm run shares at most {MAX_WRITABLE - workdir}{also}")
    shares = []
    for n, directory in enumerate(directories):
        path = os.path.realpath(directory)
        if not os.path.isdir(path):
            raise PyvmmError(f"--rw {directory}: no such directory")
        if path == "/":
            raise PyvmmError("--rw /: the host's root is shared read-only; give the directories to write")
        shares.append((f"pyvmm-rw{n}", path))
    return shares


def _kernel_and_modules(options: RunOptions) -> tuple[Path, Path]:
    kernel = options.kernel
    if kernel is None:
        kernel = default_kernel()
        if not os.access(kernel, os.R_OK):
            raise PyvmmError(f"no kernel: {kernel} is not readable here; give --kernel")
    elif not kernel.is_file():
        raise PyvmmError(f"--kernel {kernel}: no such file")
    modules = options.modules or Path("/lib/modules") / kernel_release(kernel)
    if not modules.is_dir():
        raise PyvmmError(f"no modules for the kernel: {modules} is missing; give --modules DIR")
    return kernel, modules


@contextmanager
def _logging_to(fd: int) -> Iterator[None]:
    """pyvmm's own log messages go where the kernel's go, never into the command's stderr."""
    if fd == 2:
        yield
        return
    root = logging.getLogger()
    saved = root.handlers[:]
    stream = open(fd, "w", closefd=False, buffering=1)  # noqa: SIM115 - closed below
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("pyvmm: %(name)s: %(message)s"))
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
        stream.close()


def _last_init_message(log_path: Path) -> str:
    """What the guest's /init or kernel said last about failing, from the console log."""
    try:
        text = log_path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
    for marker in ("pyvmm-init: ", "Kernel panic - not syncing: "):
        found = text.rfind(marker)
        if found >= 0:
            return text[found:].splitlines()[0].strip()
    return ""


def run_command(options: RunOptions) -> int:
    """Boot, run the command, and return the status pyvmm run exits with."""
    cwd = os.getcwd()
    kernel, modules = _kernel_and_modules(options)
    workdir = hidden_working_directory(cwd, [os.path.realpath(directory) for directory in options.writable])
    shares = _writable_shares(options.writable, workdir is not None)
    terminal = not options.command and os.isatty(0) and os.isatty(1)
    command = options.command or [os.environ.get("SHELL", "/bin/sh"), "-i"]
    env = options.env
    if terminal:
        size = os.get_terminal_size(1)
        env = [*env, f"PYVMM_ROWS={size.lines}", f"PYVMM_COLS={size.columns}"]
    script = TERMINAL_SCRIPT if terminal else SCRIPT
    plan = GuestPlan(
        modules=guest_modules(modules, terminal=terminal, overlay=workdir in PRIVATE_DIRECTORIES), writable=shares,
        argv=[b"/bin/sh", b"-c", script.encode(), b"sh", os.fsencode(cwd), *map(os.fsencode, command)],
        env=guest_environment(env, cwd), workdir=workdir)
    scratch = Path(tempfile.mkdtemp(prefix="pyvmm-run-"))
    try:
        initrd = scratch / "initramfs.cpio"
        initrd.write_bytes(build_initramfs(plan))
        return _boot(options, kernel, initrd, shares, workdir, scratch / "console.log", terminal)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _boot(options: RunOptions, kernel: Path, initrd: Path, shares: list[tuple[str, str]], workdir: str | None,
          log_path: Path, terminal: bool) -> int:
    reported: list[int] = []

    def on_status(status: int) -> None:
        reported.append(status)
        stop_current(status, "", by_host=False)  # the command's own, even 124 or 130

    def output_closed(why: str) -> None:
        host_stops_current(exit_status.OUTPUT_CLOSED, f"{why}; stopped the guest")

    def stopping() -> bool:
        machine = current_machine()
        return machine is None or machine.stop.stopping

    stdio = StdioShare(stdin_fd=0, stdout_fd=1, stderr_fd=2, on_status=on_status, output_closed=output_closed,
                       give_up=stopping)
    filesystems = [FsSpec("/", ROOT_TAG, readonly=True, hidden=HIDDEN)] + [FsSpec(path, tag) for tag, path in shares]
    if workdir:
        filesystems.append(FsSpec(workdir, WORKDIR_TAG, readonly=True))
    cmdline = CMDLINE if not options.verbose else CMDLINE.replace(" quiet", "")
    if terminal and not options.verbose:
        cmdline += " loglevel=1"  # the serial port shares the terminal: only emergencies on it
    config = MachineConfig(
        memory=options.memory, cpus=options.cpus, accel=options.accel, kernel=kernel, initrd=initrd,
        cmdline=cmdline, timeout=options.timeout, gdb=options.gdb, virtio=VirtioSpecs(filesystems=filesystems, console=terminal,
                                            prebuilt=[("pyvmm-io", VirtioFs(stdio, STDIO_TAG))]))
    log_fd = 2 if options.verbose else os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if terminal:
            # The terminal, raw (Ctrl-A x quits), for hvc0 and the serial port alike.
            console = Console(quit=lambda: host_stops_current(exit_status.INTERRUPTED, "stopped by Ctrl-A x"),
                              notice_fd=log_fd, output_failed=host_stops_current)
        else:
            console = Console(quit=lambda: None, input_fd=null_fd, output_fd=log_fd, raw=False, notice_fd=log_fd)
        with _logging_to(log_fd):
            stop = run_machine_quietly(config, console)
    finally:
        os.close(null_fd)
        if log_fd != 2:
            os.close(log_fd)
    if reported:
        return reported[0]
    if stop.by_host:  # --timeout, a signal, an output that is gone
        report(stop.reason)
        return stop.status
    why = _last_init_message(log_path) if not options.verbose else ""
    report(f"the guest could not run the command: {why or stop.reason or 'it stopped without a status'}")
    return CANNOT_RUN
