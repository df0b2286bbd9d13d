"""The L1 initramfs, built from what this machine has.

Two concatenated newc archives (the kernel unpacks them in order):

- a base, cached under $PYVMM_ASSETS/l1/ and named by the hash of its
  contents: busybox; this machine's Python at its own prefix with a pruned
  stdlib; the venv's runtime site-packages (pytest included: the tests run
  inside L1); the host tools the tests call (binutils, e2fsprogs, qemu-img)
  with the libraries `ldd` names; the kvm and virtio modules of Debian's cloud
  kernel; the Linux test assets (the L2 kernel and initramfs, and the modules
  `pyvmm run` loads);
- a small per-run payload: the project checkout, `/init` and the command.

Every Python file ships with an unchecked-hash .pyc beside it: L1 runs on a
software CPU, where compiling at import would cost minutes, and the archive
carries no usable mtimes for timestamp-checked .pycs.

The L1 kernel is Debian's cloud kernel, downloaded once into the same cache
with its modules (`apt-get download`, as tests/assets.py does for L2).
"""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.assets import (
    MANIFEST,
    CpioWriter,
    LinuxAssets,
    assets_dir,
    download_cloud_kernel,
    fetch_module_tree,
    find_module_tree,
    insmod_order,
)
from vmm.run.modules import ModuleTree, guest_modules

# Bumped when the layout below changes, so an old cached base is not reused.
BASE_VERSION = 1

# Where things live inside L1.
SITE = "/opt/pyvmm/site"        # the venv's site-packages
SRC = "/opt/pyvmm/src"          # the project checkout
ASSETS = "/opt/pyvmm/assets"    # $PYVMM_ASSETS inside L1: the L2 kernel and initramfs
MODULES = "/opt/pyvmm/modules"  # L1's kernel modules, with `order` listing them for insmod
RESULTS = "/results"            # what goes back to the host (see l1_run)

# L1 modules: kvm-amd for /dev/kvm (QEMU's -cpu max emulates SVM), the virtio
# ones for the results disk.
L1_MODULES = ("irqbypass", "kvm", "kvm-amd", "virtio", "virtio_ring", "virtio_mmio", "virtio_blk")

# Host programs the tests run (need_tool and friends), found on PATH.
HOST_TOOLS = ("as", "ld", "mke2fs", "debugfs", "e2fsck", "qemu-img")
HOST_FILES = ("/etc/mke2fs.conf",)

# Not needed to run tests: development tools, the software CPU (L1 runs only
# --accel kvm), and the editable install's hooks (the checkout is on PYTHONPATH).
SITE_EXCLUDE = re.compile(r"^(pip|setuptools|pkg_resources|_distutils_hack|distutils-precedence\.pth"
                          r"|ruff|vulture|hypothesis|_hypothesis\w*|unicorn|dev"
                          r"|__editable__\w*|pyvmm-[\w.]*\.dist-info|__pycache__)([-.].*)?$")
STDLIB_EXCLUDE = re.compile(r"^(test|idlelib|tkinter|turtledemo|ensurepip|lib2to3|pydoc_data|venv"
                            r"|site-packages|dist-packages|__pycache__|config-.*"
                            r"|_tkinter|_test\w*|_ctypes_test|_xxtestfuzz|xxlimited\w*)([-.].*)?$")
# Parts of the checkout L1 needs.
CHECKOUT = ("vmm", "devices", "boot", "tests", "bench", "pyproject.toml")

# What QEMU loads from its data directories (seen with strace), relative to
# share/: microvm's for the benchmark; the pc machine's SeaBIOS, its TPR patch
# ROM and the multiboot loader for kvm-unit-tests (tests/conformance/nested.py).
QEMU_FIRMWARE = ("qemu/bios-microvm.bin", "qemu/linuxboot_dma.bin",
                 "seabios/bios-256k.bin", "qemu/kvmvapic.bin", "qemu/multiboot_dma.bin")

# ldd as a shell script needs bash; the dynamic loader answers the same question.
LDD = "#!/bin/sh\nexec /lib64/ld-linux-x86-64.so.2 --list \"$@\"\n"


class Tree:
    """Files for the L1 root by absolute path, reproducing the host's symlinks
    on the way (on merged-/usr Debian /lib is a link to usr/lib)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, object, int]] = {}  # path -> (kind, source, mode)

    def _real_parent(self, path: str) -> str:
        """`path` with every symlinked directory above it resolved, the links recorded."""
        parts = Path(path).parts[1:]
        current = "/"
        for index, part in enumerate(parts[:-1]):
            candidate = os.path.join(current, part)
            if os.path.islink(candidate):
                target = os.readlink(candidate)
                self.entries[candidate] = ("symlink", target, 0o777)
                resolved = os.path.normpath(os.path.join(current, target))
                return self._real_parent(os.path.join(resolved, *parts[index + 1:]))
            current = candidate
            self.entries.setdefault(current, ("dir", None, 0o755))
        return os.path.join(current, parts[-1])

    def host_file(self, path: str) -> None:
        """A host file at its own path (and what it links to)."""
        path = self._real_parent(os.path.abspath(path))
        if os.path.islink(path):
            target = os.readlink(path)
            self.entries[path] = ("symlink", target, 0o777)
            self.host_file(os.path.normpath(os.path.join(os.path.dirname(path), target)))
        else:
            self.entries[path] = ("file", Path(path), os.stat(path).st_mode & 0o777)

    def host_tree(self, top: str, at: str, exclude=lambda name: False) -> None:
        """Every file under host directory `top`, placed under `at`, with a .pyc beside each .py."""
        for directory, subdirectories, files in os.walk(top):
            subdirectories[:] = sorted(d for d in subdirectories if not exclude(d) and d != "__pycache__")
            relative = os.path.relpath(directory, top)
            target = os.path.normpath(os.path.join(at, relative))
            for name in sorted(files):
                if exclude(name) or name.endswith(".pyc"):
                    continue
                source = os.path.join(directory, name)
                if os.path.islink(source):
                    self.symlink(os.path.join(target, name), os.readlink(source))
                    continue
                self.file(os.path.join(target, name), Path(source), os.stat(source).st_mode & 0o777)
                if name.endswith(".py"):
                    cache = os.path.join(target, "__pycache__", f"{name[:-3]}.{sys.implementation.cache_tag}.pyc")
                    self.entries[self._real_parent(cache)] = ("pyc", os.path.join(target, name), 0o644)

    def file(self, path: str, source: Path | bytes, mode: int = 0o644) -> None:
        self.entries[self._real_parent(path)] = ("file", source, mode)

    def symlink(self, path: str, target: str) -> None:
        self.entries[self._real_parent(path)] = ("symlink", target, 0o777)

    def elf_files(self) -> list[Path]:
        return [source for kind, source, _ in self.entries.values()
                if kind == "file" and isinstance(source, Path) and _is_elf(source)]

    def digest(self) -> str:
        """A hash of everything the archive would hold."""
        digest = hashlib.sha256(f"{BASE_VERSION} {sys.version}".encode())
        for path in sorted(self.entries):
            kind, source, mode = self.entries[path]
            digest.update(f"{path}\0{kind}\0{mode}\0".encode())
            if kind == "symlink":
                digest.update(str(source).encode())
            elif kind == "file":
                digest.update(hashlib.sha256(_content(source)).digest())
        return digest.hexdigest()

    def write(self, out) -> None:
        """The newc archive of the tree (parents sort before their contents)."""
        cpio = CpioWriter(out)
        sources = {path: entry[1] for path, entry in self.entries.items() if entry[0] == "file"}
        for path in sorted(self.entries):
            kind, source, mode = self.entries[path]
            name = path.lstrip("/")
            if kind == "dir":
                cpio.directory(name)
            elif kind == "symlink":
                cpio.symlink(name, source)
            elif kind == "file":
                cpio.file(name, _content(source), mode)
            elif compiled := _pyc(_content(sources[source]), source):  # from the .py shipped at `source`
                cpio.file(name, compiled, mode)
        cpio.finish()


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _content(source: Path | bytes) -> bytes:
    return source if isinstance(source, bytes) else source.read_bytes()


def _pyc(source: bytes, path_in_l1: str) -> bytes:
    """An unchecked-hash .pyc of `source`, whose tracebacks name its path in L1."""
    with tempfile.TemporaryDirectory() as scratch:
        py, pyc = os.path.join(scratch, "m.py"), os.path.join(scratch, "m.pyc")
        Path(py).write_bytes(source)
        try:
            py_compile.compile(py, cfile=pyc, dfile=path_in_l1, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        except py_compile.PyCompileError:
            return b""  # not valid Python here (a template, a py2 leftover): no .pyc, as compileall does
        return Path(pyc).read_bytes()


def libraries(programs: list[Path]) -> set[str]:
    """The shared libraries `ldd` names for these ELF files (ones it cannot find are left out)."""
    found: set[str] = set()
    for program in programs:
        listing = subprocess.run(["ldd", str(program)], capture_output=True, text=True, check=False).stdout
        found.update(re.findall(r"(/\S+) \(0x", listing))
    return found


def loaded_by_name() -> set[str]:
    """The libraries pyvmm opens by name as it runs, which `ldd` cannot see: liblz4
    (boot/lz4_legacy.py), where this host has it, by the name pyvmm opens."""
    from boot import lz4_legacy

    decoder = lz4_legacy.liblz4_decoder()  # holds the library open while its path is read
    if decoder is None:
        return set()
    with open("/proc/self/maps") as maps:
        loaded = {line.split()[-1] for line in maps if os.path.basename(line.split()[-1]).startswith("liblz4.so")}
    return {os.path.join(os.path.dirname(path), lz4_legacy.LIBLZ4) for path in loaded}


# -- the L1 kernel -------------------------------------------------------------------------


@dataclass(frozen=True)
class L1Kernel:
    kernel: Path
    modules: tuple[Path, ...]  # in insmod order


def l1_kernel(cache: Path | None = None) -> L1Kernel:
    """Debian's cloud kernel and the L1 modules from the same package, downloaded once."""
    cache = (cache or assets_dir()) / "l1-kernel"
    manifest = cache / "manifest.json"
    if not manifest.exists():
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix="fetch-") as scratch:
            tree, _ = download_cloud_kernel(Path(scratch))
            (kernel,) = sorted((tree / "boot").glob("vmlinuz-*"))
            shutil.copyfile(kernel, cache / kernel.name)
            found = {}
            for name in L1_MODULES:
                (module,) = sorted(tree.glob(f"lib/modules/*/kernel/**/{name}.ko"))
                found[name] = module.read_bytes()
            order = insmod_order(found)
            for name in order:
                (cache / f"{name}.ko").write_bytes(found[name])
        temporary = cache / "manifest.json.tmp"
        temporary.write_text(json.dumps({"kernel": kernel.name, "modules": order}) + "\n")
        temporary.rename(manifest)
    recorded = json.loads(manifest.read_text())
    return L1Kernel(cache / recorded["kernel"], tuple(cache / f"{name}.ko" for name in recorded["modules"]))


# -- the base archive ----------------------------------------------------------------------


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def base_tree(kernel: L1Kernel, assets: LinuxAssets) -> Tree:
    tree = Tree()
    # /run too: pyvmm run mounts a tmpfs there in its guest, over the shared root.
    for directory in ("/dev", "/proc", "/sys", "/tmp", "/root", "/run", RESULTS):
        tree.entries[directory] = ("dir", None, 0o755)
    tree.entries["/tmp"] = ("dir", None, 0o1777)
    for top in ("/bin", "/sbin", "/lib", "/lib64"):  # merged /usr: busybox --install needs them all
        if os.path.islink(top):
            target = os.path.normpath(os.path.join("/", os.readlink(top)))
            tree.entries[top] = ("symlink", os.readlink(top), 0o777)
            tree.entries.setdefault(target, ("dir", None, 0o755))
        else:
            tree.entries.setdefault(top, ("dir", None, 0o755))
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox is not installed: apt-get install busybox-static")
    tree.host_file(busybox)
    tree.symlink("/bin/sh", os.path.realpath(busybox))
    tree.file("/usr/local/bin/ldd", LDD.encode(), 0o755)

    # Python at its own prefix: the interpreter, its stdlib (pruned), the venv's packages.
    tree.host_file(os.path.realpath(sys._base_executable))
    stdlib = sysconfig.get_paths()["stdlib"]
    tree.host_tree(stdlib, stdlib, exclude=lambda name: bool(STDLIB_EXCLUDE.match(name)))
    tree.host_tree(_site_packages(), SITE, exclude=lambda name: bool(SITE_EXCLUDE.match(name)))

    for tool in HOST_TOOLS:
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        if path is None:
            raise RuntimeError(f"{tool} is not installed (make deps installs it)")
        tree.host_file(path)
    for path in HOST_FILES:
        if os.path.exists(path):
            tree.host_file(path)
    for library in sorted(libraries(tree.elf_files()) | loaded_by_name()):
        tree.host_file(library)

    for module in kernel.modules:
        tree.file(f"{MODULES}/{module.name}", module)
    tree.file(f"{MODULES}/order", "".join(f"{MODULES}/{m.name}\n" for m in kernel.modules).encode())
    for path in (assets.kernel, assets.initrd, assets.kernel.parent / MANIFEST):
        tree.file(f"{ASSETS}/{path.name}", path)
    add_run_modules(tree, find_module_tree(assets) or fetch_module_tree(assets))
    return tree


def add_run_modules(tree: Tree, root: Path) -> None:
    """The part of the L2 kernel's module tree that `pyvmm run` loads (tests/boot/test_run.py),
    where tests/assets.py looks for the tree: not all of its 90 MB."""
    paths = [ModuleTree.open(root).files[name] for name, _ in guest_modules(root, terminal=True)]
    at = f"{ASSETS}/modules/{root.name}"
    for path in paths:
        tree.file(f"{at}/{path}", root / path)
    tree.file(f"{at}/modules.order", "".join(f"{path}\n" for path in paths).encode())
    tree.file(f"{at}/modules.builtin", root / "modules.builtin")


def qemu_tree() -> Tree:
    """QEMU on KVM, the peer of the benchmark (microvm) and of kvm-unit-tests (pc): the binary, its
    libraries, its firmware."""
    tree = Tree()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise RuntimeError("qemu-system-x86_64 is not installed: apt-get install qemu-system-x86")
    tree.host_file(qemu)
    share = Path(os.path.realpath(qemu)).parent.parent / "share"
    for firmware in QEMU_FIRMWARE:
        tree.host_file(str(share / firmware))
    for library in sorted(libraries(tree.elf_files())):
        tree.host_file(library)
    return tree


def cached_archive(name: str, tree: Tree, cache: Path | None = None) -> Path:
    """`tree` as a newc archive in the cache, named by the hash of its contents (only
    the newest of each name is kept)."""
    directory = (cache or assets_dir()) / "l1"
    path = directory / f"{name}-{tree.digest()[:16]}.cpio"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        # Written under a name of its own and renamed: two runs may build it at once.
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as out:
                tree.write(out)
            temporary.rename(path)
        finally:
            temporary.unlink(missing_ok=True)
        for stale in directory.glob(f"{name}-*.cpio"):
            if stale != path:
                stale.unlink(missing_ok=True)
    return path


# -- the per-run payload -------------------------------------------------------------------


def payload(repo: Path, init: str, files: dict[str, bytes]) -> bytes:
    """The checkout (with .pycs), /init and `files` (absolute path -> content) as a newc archive."""
    tree = Tree()
    for name in CHECKOUT:
        source = repo / name
        if source.is_dir():
            tree.host_tree(str(source), f"{SRC}/{name}",
                           exclude=lambda entry: entry in {"__pycache__", ".pytest_cache", "build"})
        elif source.exists():
            tree.file(f"{SRC}/{name}", source)
    tree.file("/init", init.encode(), 0o755)
    for path, content in files.items():
        tree.file(path, content, 0o755)
    with tempfile.TemporaryFile() as out:
        tree.write(out)
        out.seek(0)
        return out.read()


def python_in_l1() -> str:
    """The interpreter's path inside L1 (its path here)."""
    return os.path.realpath(sys._base_executable)


def initramfs(archives: list[Path], extra: bytes, destination: Path) -> Path:
    """The cached archives followed by the per-run one."""
    with open(destination, "wb") as out:
        for archive in archives:
            with open(archive, "rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
        out.write(extra)
    return destination

