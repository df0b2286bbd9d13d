"""The initramfs of one `pyvmm run`: the modules the guest needs and its /init.

Uncompressed (the kernel unpacks it at memory speed and pyvmm spends no time
compressing): /dev/console for init's stdio, the modules under /modules, the
mount point /root, and /init (vmm/run/init_program.py), which mounts the
shares described by `GuestPlan` and execs the host's /bin/sh with the command.
"""

from __future__ import annotations

from dataclasses import dataclass

from boot.cpio import CpioWriter
from vmm.run.init_program import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, InitProgram, Mount

ROOT_TAG = "pyvmm-root"
STDIO_TAG = "pyvmm-io"
STDIO_DIR = "/run/pyvmm"
WORKDIR_TAG = "pyvmm-cwd"

# What the guest has of its own, mounted over the host's view once / is the host's.
_GUEST_MOUNTS = (
    Mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    Mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    Mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    Mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666", make_target=True),
    Mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", make_target=True),
    Mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    Mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    Mount("tmpfs", "/var/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", required=False),
)
# The guest's own directories: a fresh tmpfs each, which hides the host's directory there.
PRIVATE_DIRECTORIES = {m.target: int(m.options.removeprefix("mode="), 8) for m in _GUEST_MOUNTS if m.fstype == "tmpfs"}


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def hidden_working_directory(cwd: str, writable: list[str]) -> str | None:
    """`cwd` if one of the guest's own directories hides it and no --rw share shows it, else None."""
    if any(_within(cwd, directory) for directory in writable):
        return None
    return cwd if any(_within(cwd, directory) for directory in PRIVATE_DIRECTORIES) else None


def _working_directory_mounts(path: str) -> list[Mount]:
    """The host's working directory, read-only at its own path. Where it is one of the guest's own
    directories itself (cwd /tmp), an overlay keeps that directory writable: the host's files below,
    the guest's writes in its tmpfs above and kept from the host, as before (virtme-ng shows /tmp so)."""
    if path not in PRIVATE_DIRECTORIES:
        return [Mount(WORKDIR_TAG, path, "virtiofs", MS_RDONLY, make_target=True)]
    lower, upper, work = (f"{path}/.pyvmm-{layer}" for layer in ("lower", "upper", "work"))
    return [Mount(WORKDIR_TAG, lower, "virtiofs", MS_RDONLY, make_target=True),
            Mount("overlay", path, "overlay", MS_NOSUID | MS_NODEV, f"lowerdir={lower},upperdir={upper},workdir={work}",
                  make_first=((upper, PRIVATE_DIRECTORIES[path]), (work, 0o700)))]


@dataclass
class GuestPlan:
    modules: list[tuple[str, bytes]]  # (name, contents) in load order
    writable: list[tuple[str, str]]  # (virtio-fs tag, guest path) of the --rw shares
    argv: list[bytes]
    env: list[bytes]
    workdir: str | None = None  # the working directory, shared read-only at its path (WORKDIR_TAG)


def build_initramfs(plan: GuestPlan) -> bytes:
    cpio = CpioWriter()
    for directory in ("dev", "root", "modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    module_paths = []
    for name, contents in plan.modules:
        cpio.file(f"modules/{name}.ko", contents)
        module_paths.append(f"/modules/{name}.ko")
    mounts = [*_GUEST_MOUNTS, *(_working_directory_mounts(plan.workdir) if plan.workdir else ()),
              Mount(STDIO_TAG, STDIO_DIR, "virtiofs", MS_NOSUID | MS_NODEV, make_target=True)]
    mounts += [Mount(tag, path, "virtiofs", make_target=True) for tag, path in plan.writable]
    program = InitProgram(modules=module_paths, root=Mount(ROOT_TAG, "/root", "virtiofs", MS_RDONLY),
                          mounts=mounts, argv=plan.argv, env=plan.env)
    cpio.file("init", program.build(), 0o755)
    return cpio.finish()
