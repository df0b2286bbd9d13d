"""`convert` (copy an image into a new one of any format) and `compare`.

Both walk the source's extent map, resolved through its backing chain, so
ranges that read as zeros are skipped, not copied: holes stay holes, and a
qcow2 target gets unallocated clusters there. Data ranges are read in large
chunks and each cluster-sized piece that turns out to be all zeros is
skipped too, as qemu-img does.
"""

from __future__ import annotations

from collections.abc import Callable

from vmm.errors import PyvmmError
from vmm.image.base import BlockDevice, Extent
from vmm.image.open import atomic_output, create_image, open_image
from vmm.image.qcow2 import Qcow2Image
from vmm.image.qcow2_create import Qcow2Options

Progress = Callable[[int], None]  # called with the number of bytes just processed
_CHUNK = 2 << 20


def convert(src_path: str, src_fmt: str | None, dst_path: str, dst_fmt: str, *,
            compress: bool = False, options: Qcow2Options | None = None,
            progress: Progress | None = None) -> None:
    """Copy `src_path` (flattening its backing chain) into a new image `dst_path`."""
    if compress and dst_fmt != "qcow2":
        raise PyvmmError("compression is only supported for qcow2 output")
    with open_image(src_path, src_fmt) as src, atomic_output(dst_path) as tmp:
        create_image(tmp, dst_fmt, src.size, options=options, target=dst_path)
        dst = open_image(tmp, dst_fmt, readonly=False)
        try:
            _copy(src, dst, compress, progress)
            dst.flush()
        finally:
            dst.close()


def _copy(src: BlockDevice, dst: BlockDevice, compress: bool, progress: Progress | None) -> None:
    # A qcow2 target is written in whole clusters; a raw one in 64 KiB blocks.
    block = dst.cluster_size if isinstance(dst, Qcow2Image) else 65536
    zeros = bytes(block)
    for extent in src.map():
        if extent.kind == "zero":
            if progress:
                progress(extent.length)
            continue
        pos = extent.offset
        # Work on block-aligned chunks so every piece is a whole block.
        pos -= pos % block
        while pos < extent.end:
            end = min(pos + _CHUNK, extent.end + (-extent.end % block), src.size)
            data = src.read(pos, end - pos)
            for start in range(0, len(data), block):
                piece = data[start : start + block]
                if piece == zeros[: len(piece)]:
                    continue
                if compress:
                    dst.write_compressed(pos + start, piece)
                else:
                    dst.write(pos + start, piece)
            if progress:
                progress(min(end, extent.end) - max(pos, extent.offset))
            pos = end


def compare(path_a: str, fmt_a: str | None, path_b: str, fmt_b: str | None, *,
            strict: bool = False, progress: Progress | None = None) -> tuple[bool, str]:
    """(identical?, message) as `qemu-img compare` prints it."""
    with open_image(path_a, fmt_a) as a, open_image(path_b, fmt_b) as b:
        if strict and a.size != b.size:
            return False, "Strict mode: Image size mismatch!"
        common = min(a.size, b.size)
        mismatch = _first_difference(a, b, common, progress)
        if mismatch is not None:
            return False, f"Content mismatch at offset {mismatch}!"
        warning = ""
        if a.size != b.size:
            warning = "Warning: Image size mismatch!\n"
            longer = a if a.size > b.size else b
            nonzero = _first_nonzero(longer, common, longer.size - common, progress)
            if nonzero is not None:
                return False, warning + f"Content mismatch at offset {nonzero}!"
        return True, warning + "Images are identical."


def _segments(a: list[Extent], b: list[Extent]):
    """Walk two extent maps of the same range together: (start, end, both_zero) pieces."""
    i = j = 0
    while i < len(a) and j < len(b):
        start = max(a[i].offset, b[j].offset)
        end = min(a[i].end, b[j].end)
        if end > start:
            yield start, end, a[i].kind == "zero" and b[j].kind == "zero"
        if a[i].end == end:
            i += 1
        if b[j].end == end:
            j += 1


def _first_difference(a: BlockDevice, b: BlockDevice, length: int,
                      progress: Progress | None) -> int | None:
    if not length:
        return None
    for start, end, both_zero in _segments(a.map(0, length), b.map(0, length)):
        pos = start
        while not both_zero and pos < end:
            stop = min(pos + _CHUNK, end)
            data_a, data_b = a.read(pos, stop - pos), b.read(pos, stop - pos)
            if data_a != data_b:
                return pos + next(i for i in range(len(data_a)) if data_a[i] != data_b[i])
            pos = stop
        if progress:
            progress(end - start)
    return None


def _first_nonzero(image: BlockDevice, offset: int, length: int,
                   progress: Progress | None) -> int | None:
    for extent in image.map(offset, length):
        if extent.kind == "zero":
            continue
        pos = extent.offset
        while pos < extent.end:
            end = min(pos + _CHUNK, extent.end)
            data = image.read(pos, end - pos)
            stripped = data.lstrip(b"\0")
            if stripped:
                return pos + len(data) - len(stripped)
            pos = end
        if progress:
            progress(extent.length)
    return None
