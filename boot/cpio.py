"""newc ("070701") cpio archives, the format the kernel unpacks as an initramfs.

Linux unpacks concatenated archives in order (later files win), so a cached
archive and a small per-run one can simply be joined; an uncompressed archive
that follows another must start 4-byte aligned.
"""

from __future__ import annotations

import io
from typing import BinaryIO


class CpioWriter:
    """A newc ("070701") cpio archive, the format the kernel unpacks as initramfs.

    Built in memory, or written to `out` as it goes (large archives)."""

    def __init__(self, out: BinaryIO | None = None) -> None:
        self.out = out if out is not None else io.BytesIO()
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self.inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        """End the archive; its bytes when built in memory (b"" when written to `out`)."""
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue() if isinstance(self.out, io.BytesIO) else b""
