"""Which kernel and which modules `pyvmm run` boots, found the way a distribution's tools find them.

The kernel defaults to the host's own (/boot/vmlinuz-$(uname -r)); its
modules to /lib/modules/<version>, the version read from the bzImage header.
The guest needs virtio-mmio, virtio-fs and FUSE (and pvpanic, when it is
there, so that a guest panic ends the run at once). Each is either built in
(listed in modules.builtin) or a module file, loaded after the modules it
depends on: from modules.dep when depmod made one, else from the `depends=`
that every module carries in its own .modinfo section (an unpacked .deb has
no modules.dep). Compressed modules (.ko.zst on Ubuntu, .ko.xz on Fedora and
Arch, .ko.gz) are decompressed here, so the guest's kernel needs no module
decompression of its own.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from boot.decompress import data_errors, gunzip, unxz, unzstd
from vmm.errors import PyvmmError
from vmm.layout import MiB

# What the guest cannot do without, with the kernel option that provides it.
REQUIRED = (("virtio_mmio", "CONFIG_VIRTIO_MMIO"), ("virtiofs", "CONFIG_VIRTIO_FS"))
# Loaded when the kernel has them as modules; a guest without them still runs.
OPTIONAL = ("pvpanic_mmio",)

_SETUP_HEADER_MAGIC = b"HdrS"


def default_kernel() -> Path:
    return Path(f"/boot/vmlinuz-{os.uname().release}")


def kernel_release(kernel: Path) -> str:
    """The release string (`uname -r` in the guest) a bzImage's header points to."""
    try:
        with open(kernel, "rb") as f:
            header = f.read(0x10400)  # the version string lies within the setup sectors
    except OSError as err:
        raise PyvmmError(f"--kernel {kernel}: {err.strerror}") from None
    if header[0x202:0x206] != _SETUP_HEADER_MAGIC:
        raise PyvmmError(f"--kernel {kernel}: not a bzImage (give --modules DIR to say where its modules are)")
    (pointer,) = struct.unpack_from("<H", header, 0x20E)
    start = pointer + 0x200
    end = header.find(b"\0", start)
    if not pointer or end < 0:
        raise PyvmmError(f"--kernel {kernel}: its header names no version (give --modules DIR)")
    return header[start:end].split(b" ")[0].decode(errors="replace")


def module_dependencies(module: bytes) -> list[str]:
    """The `depends=` list from a .ko's .modinfo section."""
    start = module.find(b"\0depends=")
    if start < 0:
        return []
    end = module.index(b"\0", start + 1)
    value = module[start + len(b"\0depends=") : end].decode()
    return [name for name in value.split(",") if name]


# Far above the largest module a distribution ships (amdgpu: about 20 MiB), so
# that a corrupt file cannot make pyvmm inflate without bound.
MAX_MODULE_SIZE = 128 * MiB
ELF_MAGIC = b"\x7fELF"


# How kbuild names what CONFIG_MODULE_COMPRESS_* makes.
MODULE_DECOMPRESSORS = {".ko.gz": gunzip, ".ko.xz": unxz, ".ko.zst": unzstd}


def decompress_module(name: str, data: bytes) -> bytes:
    """A module file's ELF image; `name` is the file's name, which says how it is compressed."""
    for suffix, decompress in MODULE_DECOMPRESSORS.items():
        if name.endswith(suffix):
            chunks, size = [], 0
            try:
                for chunk in decompress(memoryview(data)):  # chunks of at most 8 MiB
                    size += len(chunk)
                    if size > MAX_MODULE_SIZE:
                        raise PyvmmError(f"{name} decompresses to more than {MAX_MODULE_SIZE // MiB} MiB")
                    chunks.append(chunk)
            except data_errors() as err:
                raise PyvmmError(f"{name} does not decompress: {err}") from None
            data = b"".join(chunks)
            break
    else:
        if not name.endswith(".ko"):
            raise PyvmmError(f"{name} is not a kernel module (.ko, .ko.gz, .ko.xz or .ko.zst)")
    if not data.startswith(ELF_MAGIC):
        raise PyvmmError(f"{name} is not a kernel module (no ELF header)")
    return data


def _canonical(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return _canonical(base[: base.index(".ko")]) if ".ko" in base else _canonical(base)


@dataclass
class ModuleTree:
    root: Path
    files: dict[str, str]  # module name -> path relative to root
    builtin: set[str]
    dependencies: dict[str, list[str]] | None  # from modules.dep, when there is one

    @classmethod
    def open(cls, root: Path) -> ModuleTree:
        if not root.is_dir():
            raise PyvmmError(f"--modules {root}: no such directory")
        builtin = set()
        if (root / "modules.builtin").is_file():
            builtin = {_module_name(line) for line in (root / "modules.builtin").read_text().split()}
        files: dict[str, str] = {}
        dependencies = None
        if (root / "modules.dep").is_file():
            dependencies = {}
            for line in (root / "modules.dep").read_text().splitlines():
                path, _, needs = line.partition(":")
                files[_module_name(path)] = path
                dependencies[_module_name(path)] = [_module_name(n) for n in needs.split()]
        elif (root / "modules.order").is_file():
            for path in (root / "modules.order").read_text().split():
                files[_module_name(path)] = path
        else:
            for path in (root / "kernel").rglob("*.ko*") if (root / "kernel").is_dir() else ():
                files[_module_name(path.name)] = str(path.relative_to(root))
        return cls(root, files, builtin, dependencies)

    def needs(self, name: str) -> list[str]:
        if self.dependencies is not None:
            return self.dependencies.get(name, [])
        return [_canonical(n) for n in module_dependencies(self.read(name))]

    def read(self, name: str) -> bytes:
        path = self.root / self.files[name]
        try:
            contents = path.read_bytes()
        except OSError as err:
            raise PyvmmError(f"--modules {self.root}: cannot read {path.name}: {err.strerror}") from None
        try:
            return decompress_module(path.name, contents)
        except PyvmmError as err:
            raise PyvmmError(f"--modules {self.root}: {err}") from None


# An interactive shell runs on virtio-console's hvc0.
TERMINAL = (("virtio_console", "CONFIG_VIRTIO_CONSOLE"),)
# A working directory of the host's that is one of the guest's own (/tmp) is overlaid on it.
OVERLAY = (("overlay", "CONFIG_OVERLAY_FS"),)


def guest_modules(root: Path, *, terminal: bool = False, overlay: bool = False) -> list[tuple[str, bytes]]:
    """The modules the guest must load, in load order, as (name, contents);
    `terminal`: also what an interactive shell's terminal needs; `overlay`: also overlayfs."""
    tree = ModuleTree.open(root)
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order or name in tree.builtin:
            return
        if name in path:
            raise PyvmmError(f"--modules {root}: module dependency cycle through {name}")
        if name not in tree.files:
            raise PyvmmError(f"--modules {root}: module {name}, needed by {path[-1]}, is missing")
        for dependency in tree.needs(name):
            visit(dependency, path + (name,))
        order.append(name)

    required = REQUIRED + (TERMINAL if terminal else ()) + (OVERLAY if overlay else ())
    for name, option in required:
        if name not in tree.builtin and name not in tree.files:
            raise PyvmmError(f"the kernel has no {name}: it needs {option}=y or =m "
                             f"(no {name}.ko under --modules {root}, and not built in)")
    for name, _ in required:
        visit(name, ("pyvmm",))
    for name in OPTIONAL:
        if name in tree.files:
            visit(name, ("pyvmm",))
    return [(name, tree.read(name)) for name in order]
