"""Test assets: a real Debian kernel and a busybox initramfs, plus synthetic kernel images.

Real assets (`python -m tests.assets`, or `make test-assets`):
  fetches Debian's linux-image-cloud-amd64 (through its versioned dependency)
  and busybox-static with `apt-get download`, unpacks them with `dpkg-deb -x`
  and builds a gzip'd newc initramfs. Everything lives in a cache outside git:
  $PYVMM_ASSETS, default ~/.cache/pyvmm-assets. The manifest is written
  last, so an interrupted fetch is never mistaken for a finished one.

  The initramfs's /init mounts proc, sys and dev, prints "pyvmm-init: reached",
  writes one byte to pyvmm's boot-timer port (through /dev/port, or /bin/boot-mark
  where the kernel has no /dev/port), lets only emergencies reach the console
  from then on (`dmesg -n 1`), and hands over
  to busybox init, which runs a shell on the console (so `poweroff` works the
  usual way). The kernel's virtio modules are in /lib/modules/, with
  /lib/modules/virtio.order listing them in dependency order for insmod.

  The kernel package's module tree (/lib/modules/<version> as the package
  ships it: no modules.dep) is kept too, in modules/<version>, for
  `pyvmm run --modules`; a cache made before it existed gets it on demand.

Pytest: `from tests.assets import linux_assets` gives a session fixture that
skips (naming `make test-assets`) when the assets are absent;
`linux_module_tree` gives the module tree.

Synthetic assets (`make_bzimage`, `make_vmlinux`, `compress_like_kernel`):
small images built in memory that look like the real thing to the loader.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

try:
    import pytest
except ImportError:  # `python -m tests.assets` works without pytest
    pytest = None

from boot import bootparam as bp
from boot.cpio import CpioWriter  # noqa: F401 - tests build initramfs overlays with it
from devices.boot_timer import PORT as BOOT_TIMER_PORT
from vmm.run.modules import module_dependencies

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MARKER = "pyvmm-init: reached"
# Bumped whenever the initramfs changes, so a cache built by older code is rebuilt.
INITRAMFS_VERSION = 4
# The manifest and the initramfs are named by that version: checkouts of different
# versions (git worktrees, say) share one cache without rebuilding it in turn.
MANIFEST = f"manifest-v{INITRAMFS_VERSION}.json"
# Module names as the kernel spells them (virtio-rng has a dash), in no particular order.
VIRTIO_MODULES = ("virtio", "virtio_ring", "virtio_mmio", "virtio_blk", "virtio_net", "failover",
                  "net_failover", "virtio_console", "virtio-rng")
# pvpanic is a module in Debian's kernel; /init loads it so a guest panic reaches pyvmm.
PVPANIC_MODULES = ("pvpanic", "pvpanic-mmio")


def assets_dir() -> Path:
    return Path(os.environ.get("PYVMM_ASSETS", "~/.cache/pyvmm-assets")).expanduser()


@dataclass(frozen=True)
class LinuxAssets:
    kernel: Path  # the bzImage
    initrd: Path  # gzip'd newc initramfs with busybox
    kernel_version: str  # e.g. 6.1.0-56-cloud-amd64
    modules: tuple[str, ...]  # paths inside the initramfs, in insmod order


def find_linux_assets(directory: Path | None = None) -> LinuxAssets | None:
    """The cached assets, or None when they have not been (completely) fetched."""
    directory = directory or assets_dir()
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        assets = LinuxAssets(directory / manifest["kernel"], directory / manifest["initrd"],
                             manifest["kernel_version"], tuple(manifest["modules"]))
        if manifest.get("initramfs_version") != INITRAMFS_VERSION:
            return None
    except (OSError, ValueError, KeyError):
        return None
    if not (assets.kernel.is_file() and assets.initrd.is_file()):
        return None
    return assets


if pytest is not None:

    @pytest.fixture(scope="session")
    def linux_assets() -> LinuxAssets:
        assets = find_linux_assets()
        if assets is None:
            pytest.skip(f"Linux test assets are absent from {assets_dir()}: run `make test-assets`")
        return assets

    @pytest.fixture(scope="session")
    def linux_module_tree(linux_assets) -> Path:
        return find_module_tree(linux_assets) or fetch_module_tree(linux_assets)


def module_tree_path(assets: LinuxAssets) -> Path:
    return assets.kernel.parent / "modules" / assets.kernel_version


def find_module_tree(assets: LinuxAssets) -> Path | None:
    """The kernel's /lib/modules/<version> tree, when it has been unpacked into the cache."""
    tree = module_tree_path(assets)
    return tree if (tree / "modules.order").is_file() else None


def fetch_module_tree(assets: LinuxAssets) -> Path:
    """Download the kernel package named in the manifest again and keep its module tree."""
    manifest = json.loads((assets.kernel.parent / MANIFEST).read_text())
    name, version, _arch = manifest["kernel_package"].removesuffix(".deb").split("_")
    with tempfile.TemporaryDirectory(dir=assets.kernel.parent, prefix="fetch-") as scratch_name:
        scratch = Path(scratch_name)
        deb = apt_download(f"{name}={urllib.parse.unquote(version)}", scratch)
        run_tool(["dpkg-deb", "-x", str(deb), str(scratch / "root")])
        _keep_module_tree(scratch / "root" / "lib" / "modules" / assets.kernel_version, assets)
    return module_tree_path(assets)


def _keep_module_tree(unpacked: Path, assets: LinuxAssets) -> None:
    target = module_tree_path(assets)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        unpacked.rename(target)  # atomic: a concurrent fetch either wins or finds it done
    except OSError:
        if find_module_tree(assets) is None:
            raise


# -- fetching --------------------------------------------------------------------------


def run_tool(command: list[str], cwd: Path | None = None) -> str:
    """`command`'s output; a missing tool or a failure ends the program with one line saying which."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        sys.exit(f"tests.assets: {command[0]} not found (this needs Debian's apt and dpkg)")
    if result.returncode != 0:
        hint = " (run `apt-get update` first?)" if command[0].startswith("apt") else ""
        sys.exit(f"tests.assets: {' '.join(command)} failed{hint}:\n{result.stderr.strip()}")
    return result.stdout


def apt_download(package: str, into: Path, apt_options: tuple[str, ...] = ()) -> Path:
    """`package` (a name, name=version or name/suite) downloaded into `into`; `apt_options`
    (`-o` settings) point apt at other sources than the machine's."""
    before = set(into.glob("*.deb"))
    run_tool(["apt-get", *apt_options, "download", package], cwd=into)
    new = set(into.glob("*.deb")) - before
    if len(new) != 1:
        sys.exit(f"tests.assets: apt-get download {package} produced {sorted(new)}")
    return new.pop()


def _kernel_package(meta_deb: Path) -> str:
    """The versioned image package the meta package depends on, as name=version."""
    depends = run_tool(["dpkg-deb", "-f", str(meta_deb), "Depends"]).strip()
    first = depends.split(",")[0].split("|")[0].strip()  # "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
    name, _, version = first.partition(" ")
    version = version.strip("()= ")
    return f"{name}={version}" if version else name


def download_cloud_kernel(into: Path) -> tuple[Path, Path]:
    """Debian's current cloud kernel package downloaded into `into` and unpacked
    under into/root: (the unpacked tree, the .deb)."""
    meta = apt_download(KERNEL_META_PACKAGE, into)
    kernel_deb = apt_download(_kernel_package(meta), into)
    run_tool(["dpkg-deb", "-x", str(kernel_deb), str(into / "root")])
    return into / "root", kernel_deb


def fetch_linux_assets(directory: Path | None = None) -> LinuxAssets:
    directory = directory or assets_dir()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix="fetch-") as scratch_name:
        scratch = Path(scratch_name)
        tree, kernel_deb = download_cloud_kernel(scratch)
        busybox_deb = apt_download(BUSYBOX_PACKAGE, scratch)
        run_tool(["dpkg-deb", "-x", str(busybox_deb), str(tree)])

        kernels = sorted((tree / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            sys.exit(f"tests.assets: expected one vmlinuz in {kernel_deb.name}, found {kernels}")
        kernel_version = kernels[0].name.removeprefix("vmlinuz-")
        module_root = tree / "lib" / "modules" / kernel_version
        initramfs, module_paths = build_initramfs(tree / "bin" / "busybox", module_root)

        kernel = directory / kernels[0].name
        initrd = directory / f"initramfs-{kernel_version}-v{INITRAMFS_VERSION}.cpio.gz"
        shutil.copyfile(kernels[0], kernel)
        initrd.write_bytes(initramfs)
        shutil.rmtree(directory / "modules" / kernel_version, ignore_errors=True)
        _keep_module_tree(module_root, LinuxAssets(kernel, initrd, kernel_version, ()))
    manifest = {"initramfs_version": INITRAMFS_VERSION, "kernel": kernel.name, "initrd": initrd.name, "kernel_version": kernel_version,
                "modules": module_paths, "kernel_package": kernel_deb.name,
                "busybox_package": busybox_deb.name}
    temporary = directory / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    temporary.rename(directory / MANIFEST)
    return LinuxAssets(kernel, initrd, kernel_version, tuple(module_paths))


# -- the initramfs -------------------------------------------------------------------------

# /bin/boot-mark: ioperm() the boot-timer port, write 1 to it, exit. x86-64 Linux,
# no libc, assembled with binutils when the initramfs is built.
BOOT_MARK_SOURCE = f"""
    .globl _start
_start:
    mov $173, %eax              # ioperm(port, 1, 1)
    mov ${BOOT_TIMER_PORT}, %edi
    mov $1, %esi
    mov $1, %edx
    syscall
    test %rax, %rax
    jnz 1f
    mov ${BOOT_TIMER_PORT}, %dx
    mov $1, %al
    out %al, %dx
    xor %edi, %edi
    jmp 2f
1:  mov $1, %edi
2:  mov $60, %eax               # exit(status)
    syscall
"""


def build_boot_mark() -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        source, obj, binary = (Path(scratch) / name for name in ("boot-mark.S", "boot-mark.o", "boot-mark"))
        source.write_text(BOOT_MARK_SOURCE)
        run_tool(["as", "--64", "-o", str(obj), str(source)])
        run_tool(["ld", "-static", "-o", str(binary), str(obj)])
        return binary.read_bytes()


INIT_SCRIPT = f"""#!/bin/sh
# pyvmm test initramfs. Set up the basics, report "userspace reached", then let
# busybox init run a shell on the console (busybox init makes poweroff/reboot work).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
for module in /lib/modules/pvpanic.ko /lib/modules/pvpanic-mmio.ko; do
    [ -f $module ] && insmod $module
done
echo "{MARKER}"
# One byte to pyvmm's boot-timer port ({BOOT_TIMER_PORT:#x}): through /dev/port where the kernel
# has it (offset = port number), else with a three-instruction program (Debian's cloud
# kernel is built without CONFIG_DEVPORT).
if [ -c /dev/port ]; then
    printf '\\001' | dd of=/dev/port bs=1 seek={BOOT_TIMER_PORT} count=1 conv=notrunc 2>/dev/null
else
    /bin/boot-mark
fi
# From here on only emergencies (a panic, the power-off) reach the console: tests read
# their commands' output there, and a late kernel message (on a slow host, "hrtimer:
# interrupt took ...") landed in the middle of it. dmesg still has every message.
dmesg -n 1
exec /bin/busybox init
"""

INITTAB = """::respawn:-/bin/cttyhack /bin/sh -l
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sync
"""

PROFILE = """export PATH=/bin
export PS1='pyvmm# '
"""


def insmod_order(modules: dict[str, bytes]) -> list[str]:
    """Module file names, each after the modules it depends on."""
    # The kernel spells module names with underscores; a file may use dashes (virtio-rng).
    by_name = {name.replace("-", "_"): name for name in modules}
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"module dependency cycle through {name}")
        for dependency in module_dependencies(modules[name]):
            if dependency.replace("-", "_") not in by_name:
                sys.exit(f"tests.assets: module {name} needs {dependency}, which is not copied")
            visit(by_name[dependency.replace("-", "_")], path + (name,))
        order.append(name)

    for name in sorted(modules):
        visit(name, ())
    return order


def build_initramfs(busybox: Path, module_root: Path | None = None) -> tuple[bytes, list[str]]:
    """The gzip'd initramfs, and the paths of its modules in insmod order."""
    cpio = CpioWriter()
    for directory in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "lib", "lib/modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)  # init's stdio before devtmpfs is mounted
    cpio.char_device("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("bin/boot-mark", build_boot_mark(), 0o755)
    cpio.file("etc/inittab", INITTAB.encode())
    cpio.file("etc/profile", PROFILE.encode())

    modules: dict[str, bytes] = {}
    if module_root is not None:
        for name in VIRTIO_MODULES:
            found = sorted(module_root.rglob(f"{name}.ko"))
            if not found:
                sys.exit(f"tests.assets: module {name}.ko not found under {module_root}")
            modules[name] = found[0].read_bytes()
    paths = []
    for name in insmod_order(modules):
        path = f"lib/modules/{name}.ko"
        cpio.file(path, modules[name])
        paths.append("/" + path)
    if module_root is not None:
        for name in PVPANIC_MODULES:
            found = sorted(module_root.rglob(f"{name}.ko"))
            if not found:
                sys.exit(f"tests.assets: module {name}.ko not found under {module_root}")
            cpio.file(f"lib/modules/{name}.ko", found[0].read_bytes())
    cpio.file("lib/modules/virtio.order", "".join(p + "\n" for p in paths).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0), paths


# -- synthetic kernel images ------------------------------------------------------------


def make_vmlinux(segments: list[tuple[int, bytes, int]], entry: int, extra: bytes = b"",
                 virtual_offset: int = 0) -> bytes:
    """An x86-64 ELF executable with one PT_LOAD per (physical address, bytes, memory size)."""
    header_size, phdr_size = 64, 56
    offset = header_size + phdr_size * len(segments)
    phdrs, blobs = [], []
    for address, data, memory_size in segments:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, offset, address + virtual_offset, address,
                                 len(data), memory_size, 0x1000))
        blobs.append(data)
        offset += len(data)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, header_size, 0, 0,
                                 header_size, phdr_size, len(segments), 64, 0, 0)
    return header + b"".join(phdrs) + b"".join(blobs) + extra


def _lz4_legacy(data: bytes) -> bytes:
    import lz4.block

    chunk = 8 << 20
    out = [struct.pack("<I", 0x184C2102)]
    for start in range(0, len(data), chunk):
        block = lz4.block.compress(data[start : start + chunk], store_size=False)
        out.append(struct.pack("<I", len(block)) + block)
    return b"".join(out)


def compress_like_kernel(data: bytes, method: str) -> bytes:
    """Compress as the kernel build does (scripts/Makefile.lib), size trailer included."""
    size = struct.pack("<I", len(data) & 0xFFFF_FFFF)
    if method == "gzip":
        return gzip.compress(data, mtime=0)  # gzip's own ISIZE is the trailer
    if method == "bzip2":
        return bz2.compress(data) + size
    if method == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE) + size
    if method == "xz":
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}]
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                             filters=filters) + size
    if method == "lz4":
        return _lz4_legacy(data) + size
    if method == "zstd":
        import zstandard

        # The zstd tool writes a content checksum by default; so does the kernel build.
        compressor = zstandard.ZstdCompressor(level=3, write_content_size=False, write_checksum=True)
        return compressor.compress(data) + size
    if method == "uncompressed":
        return data + size
    raise ValueError(method)


def make_bzimage(payload: bytes = b"", *, setup_sects: int = 4, version: int = 0x020F,
                 pref_address: int = 0x100_0000, init_size: int = 0x40_0000,
                 kernel_alignment: int = 0x20_0000, relocatable: bool = True,
                 xloadflags: int = 0x7F, initrd_addr_max: int = 0x7FFF_FFFF,
                 cmdline_size: int = 2047, loadflags: int = bp.LOADED_HIGH,
                 decompressor: bytes = b"\x90" * 0x300) -> bytes:
    """A bzImage-shaped file: setup sectors with a 2.15-style header, then the
    protected-mode part (`decompressor` stand-in code followed by `payload`)."""
    setup_size = ((setup_sects or 4) + 1) * 512
    image = bytearray(setup_size)
    kernel = bytearray(decompressor + payload)
    kernel += bytes(-len(kernel) % 16)

    def put(offset: int, fmt: str, value) -> None:
        struct.pack_into("<" + fmt, image, offset, value)

    put(bp.SETUP_SECTS, "B", setup_sects)
    put(bp.SYSSIZE, "I", len(kernel) // 16)
    put(bp.BOOT_FLAG, "H", bp.BOOT_FLAG_MAGIC)
    put(bp.JUMP, "B", bp.SHORT_JUMP_OPCODE)
    put(bp.JUMP + 1, "B", 0x26C - bp.HEADER)
    put(bp.HEADER, "4s", bp.HEADER_MAGIC)
    put(bp.VERSION, "H", version)
    put(bp.LOADFLAGS, "B", loadflags)
    put(bp.CODE32_START, "I", 0x100000)
    put(bp.INITRD_ADDR_MAX, "I", initrd_addr_max)
    put(bp.KERNEL_ALIGNMENT, "I", kernel_alignment)
    put(bp.RELOCATABLE_KERNEL, "B", int(relocatable))
    put(bp.XLOADFLAGS, "H", xloadflags)
    put(bp.CMDLINE_SIZE, "I", cmdline_size)
    put(bp.PAYLOAD_OFFSET, "I", len(decompressor))
    put(bp.PAYLOAD_LENGTH, "I", len(payload))
    put(bp.PREF_ADDRESS, "Q", pref_address)
    put(bp.INIT_SIZE, "I", init_size)
    return bytes(image + kernel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.assets", description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="fetch again even if cached")
    args = parser.parse_args(argv)
    assets = None if args.force else find_linux_assets()
    if assets is None:
        assets = fetch_linux_assets()
    modules = find_module_tree(assets) or fetch_module_tree(assets)
    print(f"kernel: {assets.kernel}")
    print(f"initrd: {assets.initrd}")
    print(f"modules: {modules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
