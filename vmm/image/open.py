"""Opening images (format probing, backing chains) and creating them atomically.

A backing chain is opened top-down in a loop: each qcow2 names its backing
file (relative names are relative to the directory of the image naming
them) and optionally its format; without one the format is probed. A file
seen twice in one chain is a loop and is refused.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from vmm.errors import PyvmmError
from vmm.image.base import BlockDevice, CorruptImageError
from vmm.image.qcow2 import Qcow2Image
from vmm.image.qcow2_create import Qcow2Options, build_qcow2
from vmm.image.qcow2_format import MAGIC
from vmm.image.raw import RawImage

FORMATS = ("qcow2", "raw")


def probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise PyvmmError(f"cannot open {path}: {err.strerror}") from None
    return "qcow2" if magic == MAGIC else "raw"


def resolve_backing(image_path: str, backing_name: str) -> str:
    if os.path.isabs(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(image_path), backing_name)


def _open_one(path: str, fmt: str | None, readonly: bool, repair: bool = False) -> BlockDevice:
    fmt = fmt or probe_format(path)
    if fmt not in FORMATS:
        raise PyvmmError(f"unknown image format {fmt!r} (expected qcow2 or raw)")
    try:
        if fmt == "raw":
            return RawImage(path, readonly)
        return Qcow2Image(path, readonly, repair=repair)
    except OSError as err:
        raise PyvmmError(f"cannot open {path}: {err.strerror}") from None


def open_image(path: str, fmt: str | None = None, readonly: bool = True, *,
               backing: bool = True, repair: bool = False) -> BlockDevice:
    """Open an image and its whole backing chain (backing images read-only).

    A qcow2 image opened for writing that carries the dirty bit has its
    refcounts rebuilt first, as QEMU does.
    """
    top = _open_one(path, fmt, readonly, repair)
    try:
        if backing:
            _attach_backing_chain(top)
        if isinstance(top, Qcow2Image) and not readonly and not repair and top.header.dirty:
            _repair_dirty(top)
    except BaseException:
        _close_quietly(top)
        raise
    return top


def _close_quietly(image: BlockDevice) -> None:
    if isinstance(image, Qcow2Image):
        image.abandon()
    else:
        image.close()


def _attach_backing_chain(top: BlockDevice) -> None:
    seen = [os.path.realpath(top.filename)]
    layer = top
    while isinstance(layer, Qcow2Image) and layer.header.backing_file:
        hdr = layer.header
        path = resolve_backing(layer.filename, hdr.backing_file)
        real = os.path.realpath(path)
        if real in seen:
            chain = " -> ".join(seen + [real])
            raise CorruptImageError(f"{top.filename}: backing chain loops: {chain}")
        seen.append(real)
        if not os.path.exists(path):
            raise PyvmmError(f"{layer.filename}: backing file {hdr.backing_file!r} not found "
                             f"(looked for {path})")
        fmt = hdr.backing_format
        if fmt is not None and fmt not in FORMATS:
            raise PyvmmError(f"{layer.filename}: unsupported backing format {fmt!r}")
        layer.backing = _open_one(path, fmt, readonly=True)
        layer = layer.backing


def _repair_dirty(image: Qcow2Image) -> None:
    from vmm.image.qcow2_check import check_qcow2

    result = check_qcow2(image, repair="all")  # clears the dirty bit when it succeeds
    if result.corruptions:
        raise CorruptImageError(f"{image.filename}: image was not closed cleanly and its "
                                "refcounts could not be repaired; run `pyvmm img check`")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """A temporary file next to `path`, renamed over it only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                   dir=directory)
    except OSError as err:
        raise PyvmmError(f"cannot create {path}: {err.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def create_image(path: str, fmt: str, size: int | None, *, backing_file: str | None = None,
                 backing_format: str | None = None, options: Qcow2Options | None = None,
                 target: str | None = None) -> int:
    """Create an empty image at `path`; returns its size.

    `target` is the name the image will finally have (when `path` is a
    temporary file): backing names are resolved relative to it.
    """
    final = target or path
    if fmt not in FORMATS:
        raise PyvmmError(f"unknown image format {fmt!r} (expected qcow2 or raw)")
    if backing_file:
        if fmt != "qcow2":
            raise PyvmmError("only qcow2 images can have a backing file")
        resolved = resolve_backing(final, backing_file)
        if os.path.realpath(resolved) == os.path.realpath(final):
            raise PyvmmError(f"{final}: an image cannot be its own backing file")
        with open_image(resolved, backing_format) as base:
            if backing_format is None:
                backing_format = base.format_name
            if size is None:
                size = base.size
    if size is None:
        raise PyvmmError("an image size is needed (or a backing file to take it from)")
    if size < 0:
        raise PyvmmError("image size must not be negative")
    if fmt == "qcow2":
        size = -(-size // 512) * 512  # qcow2 sizes are whole sectors, as qemu-img rounds them
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as err:
        raise PyvmmError(f"cannot create {path}: {err.strerror}") from None
    try:
        if fmt == "raw":
            os.ftruncate(fd, size)
        else:
            build_qcow2(fd, size, options or Qcow2Options(), backing_file, backing_format)
    finally:
        os.close(fd)
    return size
