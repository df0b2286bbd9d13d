"""Raw images: the disk is the file, byte for byte (or a host block device).

Holes in a sparse file read as zeros; `map` finds them with SEEK_DATA /
SEEK_HOLE so that `convert` keeps them sparse, and `discard` /
`write_zeroes` punch holes where the filesystem allows it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading

from vmm.image.base import BlockDevice, Extent, Hole, ImageError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded in this process
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range (it then reads as zeros). False if the filesystem can't."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


# The most buffers one preadv/pwritev takes (Linux's UIO_MAXIOV).
_IOV_MAX = 1024


def _after(buffers: list[memoryview], count: int) -> list[memoryview]:
    """What is left of `buffers` once the first `count` bytes are done."""
    for index, buffer in enumerate(buffers):
        if count < len(buffer):
            return [buffer[count:], *buffers[index + 1 :]]
        count -= len(buffer)
    return []


class RawImage(BlockDevice):
    format_name = "raw"

    def __init__(self, path: str, readonly: bool = True) -> None:
        self.filename = path
        self.readonly = readonly
        self.backing = None
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            mode = os.fstat(self._fd).st_mode
            if stat.S_ISREG(mode):
                self.size = os.fstat(self._fd).st_size
            elif stat.S_ISBLK(mode):
                self.size = os.lseek(self._fd, 0, os.SEEK_END)
            else:
                raise ImageError(f"{path}: not a regular file or block device")
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False

    def _read_layer(self, out: memoryview, out_offset: int, offset: int, length: int) -> list[Hole]:
        self._read_fully([out[offset - out_offset : offset - out_offset + length]], offset)
        return []

    def _map_layer(self, offset: int, length: int) -> tuple[list[Extent], list[Hole]]:
        extents: list[Extent] = []
        end = offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data after pos
                    data = end
                elif err.errno == errno.EINVAL:  # no SEEK_DATA support: all data
                    return [Extent(offset, length, "data")], []
                else:
                    raise
            data = min(data, end)
            if data > pos:
                extents.append(Extent(pos, data - pos, "zero"))
            if data >= end:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            extents.append(Extent(data, hole - data, "data"))
            pos = hole
        return extents, []

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write_from(offset, [memoryview(data).cast("B")])

    def read_into(self, offset: int, buffers: list[memoryview]) -> None:
        self._check_range(offset, sum(map(len, buffers)))
        self._read_fully(buffers, offset)

    def _read_fully(self, buffers: list[memoryview], offset: int) -> None:
        remaining = sum(map(len, buffers))
        while remaining:
            got = os.preadv(self._fd, buffers[:_IOV_MAX], offset)
            if got == 0:  # a file shrunk under us reads as zeros
                for buffer in buffers:
                    buffer[:] = bytes(len(buffer))
                return
            offset += got
            remaining -= got
            if remaining:  # (a 1 MiB request is 256 buffers: not walked again when done)
                buffers = _after(buffers, got)

    def write_from(self, offset: int, buffers: list[memoryview]) -> None:
        self._check_writable()
        remaining = sum(map(len, buffers))
        self._check_range(offset, remaining)
        while remaining:
            done = os.pwritev(self._fd, buffers[:_IOV_MAX], offset)
            offset += done
            remaining -= done
            if remaining:
                buffers = _after(buffers, done)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if length and not punch_hole(self._fd, offset, length):
            chunk = bytes(min(length, 1 << 20))
            pos = offset
            while pos < offset + length:
                count = min(len(chunk), offset + length - pos)
                self.write(pos, chunk[:count])
                pos += count

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if length:
            punch_hole(self._fd, offset, length)

    def flush(self) -> None:
        if not self.readonly and not self._closed:
            os.fdatasync(self._fd)

    def resize(self, new_size: int) -> None:
        self._check_writable()
        os.ftruncate(self._fd, new_size)
        self.size = new_size

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            finally:
                self._closed = True
                os.close(self._fd)

    def fileno(self) -> int:
        """The open file (virtio-blk's compiled request path reads and writes it itself)."""
        return self._fd

    def file_size(self) -> int:
        return os.fstat(self._fd).st_size
