"""The block-device interface every disk image implements, and its errors.

A `BlockDevice` is a byte-addressed disk of fixed `size`:

    read(offset, length) -> bytes        any range inside [0, size)
    read_into(offset, buffers)           the same, scattered into writable buffers
    write(offset, data)                  raises ReadOnlyImageError if readonly
    write_from(offset, buffers)          the same, gathered from buffers
    write_zeroes(offset, length)         afterwards the range reads as zeros
    discard(offset, length)              a hint: whole clusters may be freed;
                                         what the range reads afterwards is
                                         either its old data or zeros
    flush()                              everything written before the call
                                         survives a crash of the process or
                                         of the host
    close()                              flushes first; idempotent
    map(offset, length) -> [Extent]      which parts hold data and which read
                                         as zeros (used to keep holes sparse)

Ranges outside the disk raise `ImageRangeError` (a `PyvmmError`), so a
device model can turn them into an I/O error status for the guest instead
of crashing. An image may sit on a read-only `backing` image: parts it does
not hold itself read through to the backing image, and reads beyond the end
of a (smaller) backing image return zeros. Reads walk the backing chain in
a loop, not by recursion, so chains of any depth work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vmm.errors import PyvmmError

ExtentKind = Literal["data", "zero"]


class ImageError(PyvmmError):
    """Something is wrong with a disk image or the way it was used."""


class ImageRangeError(ImageError):
    """A read or write fell (partly) outside the disk."""


class ReadOnlyImageError(ImageError):
    """A write was attempted on an image opened read-only."""


class CorruptImageError(ImageError):
    """The image's metadata is inconsistent; the operation was refused."""


class UnsupportedImageError(ImageError):
    """The image uses a feature this library refuses to handle."""


@dataclass(frozen=True)
class Extent:
    """A run of the disk that either holds data or reads as zeros."""

    offset: int
    length: int
    kind: ExtentKind

    @property
    def end(self) -> int:
        return self.offset + self.length


# One unresolved range a layer does not hold: (disk offset, length).
Hole = tuple[int, int]


class BlockDevice:
    """Base class: the chain walk for `read` and `map`, range checks, context manager.

    Subclasses implement the per-layer primitives `_read_layer` and
    `_map_layer`, which fill in what this layer holds and hand back the holes
    that the backing image must answer.
    """

    filename: str
    format_name: str
    size: int
    readonly: bool
    backing: BlockDevice | None = None

    # --- per-layer primitives -------------------------------------------------

    def _read_layer(self, out: memoryview, out_offset: int, offset: int, length: int) -> list[Hole]:
        """Copy what this layer holds of [offset, offset+length) into out[offset-out_offset:].

        Returns the ranges it does not hold (to be read from the backing image).
        `out` starts zero-filled, so ranges that read as zeros need no copy.
        """
        raise NotImplementedError

    def _map_layer(self, offset: int, length: int) -> tuple[list[Extent], list[Hole]]:
        """Extents this layer decides, plus the holes its backing image decides."""
        raise NotImplementedError

    # --- the public interface -------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        out = bytearray(length)
        self._read_chain(memoryview(out), offset, offset, length)
        return bytes(out)

    def read_into(self, offset: int, buffers: list[memoryview]) -> None:
        """Read as many bytes as `buffers` hold, from `offset`, into them in order.

        This one reads and copies; a format that can read straight into the
        buffers (raw: one preadv) overrides it. virtio-blk passes views of
        guest RAM, so the disk's data need not pass through a bytes object.
        """
        data = memoryview(self.read(offset, sum(len(buffer) for buffer in buffers)))
        position = 0
        for buffer in buffers:
            buffer[:] = data[position : position + len(buffer)]
            position += len(buffer)

    def write_from(self, offset: int, buffers: list[memoryview]) -> None:
        """Write the concatenation of `buffers` at `offset` (raw overrides it with pwritev)."""
        self.write(offset, b"".join(buffers))

    def _read_chain(self, out: memoryview, out_offset: int, offset: int, length: int) -> None:
        """Fill out[...] from this layer and then, layer by layer, from the backing chain."""
        pending: list[Hole] = [(offset, length)]
        layer: BlockDevice | None = self
        while pending and layer is not None:
            unresolved: list[Hole] = []
            for start, count in pending:
                # A smaller backing image reads as zeros beyond its end.
                count = min(count, layer.size - start)
                if count > 0:
                    unresolved.extend(layer._read_layer(out, out_offset, start, count))
            pending = unresolved
            layer = layer.backing

    def map(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Sorted, merged extents covering [offset, offset+length), resolved through the chain."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        extents: list[Extent] = []
        pending: list[Hole] = [(offset, length)]
        layer: BlockDevice | None = self
        while pending:
            unresolved: list[Hole] = []
            for start, count in pending:
                if layer is None or start >= layer.size:
                    extents.append(Extent(start, count, "zero"))
                    continue
                inside = min(count, layer.size - start)
                if inside < count:
                    extents.append(Extent(start + inside, count - inside, "zero"))
                decided, holes = layer._map_layer(start, inside)
                extents.extend(decided)
                unresolved.extend(holes)
            pending = unresolved
            layer = layer.backing if layer is not None else None
        return merge_extents(extents)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def chain(self) -> list[BlockDevice]:
        """This image followed by its backing images, top first."""
        layers: list[BlockDevice] = []
        layer: BlockDevice | None = self
        while layer is not None:
            layers.append(layer)
            layer = layer.backing
        return layers

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers for subclasses ---------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageRangeError(
                f"{self.filename}: access at offset {offset} length {length} "
                f"is outside the disk (size {self.size})"
            )

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyImageError(f"{self.filename}: image is open read-only")


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Sort extents and merge neighbours of the same kind."""
    merged: list[Extent] = []
    for ext in sorted(extents, key=lambda e: e.offset):
        if ext.length <= 0:
            continue
        if merged and merged[-1].kind == ext.kind and merged[-1].end == ext.offset:
            last = merged.pop()
            ext = Extent(last.offset, last.length + ext.length, ext.kind)
        merged.append(ext)
    return merged
