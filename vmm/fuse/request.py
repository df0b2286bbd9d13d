"""A FUSE request as the server reads it, and the reply it hands back.

The transport (virtio-fs) gives the server the request's bytes in pieces of
guest memory. The server reads the header and the operation's arguments as
bytes, but a WRITE's data is handed to the host as memory views, and a
READ's reply names the file range instead of carrying the data: the device
reads it with preadv straight into the guest's buffers. Tests use
`BytesRequest` and `Reply.to_bytes()`, which do the same with plain bytes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from vmm.fuse import protocol as p


class Request:
    """The device-readable bytes of one request; `length` of them."""

    length: int = 0

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def views(self, offset: int, length: int) -> AbstractContextManager[list[memoryview]]:
        """Zero-copy windows onto `length` bytes from `offset`, valid inside the block."""
        raise NotImplementedError


class BytesRequest(Request):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    @contextmanager
    def views(self, offset: int, length: int) -> Iterator[list[memoryview]]:
        with memoryview(self.data) as view:
            yield [view[offset : offset + length]]


@dataclass
class FileRange:
    """Reply data still in a host file: up to `length` bytes of `fd` from `offset`."""

    fd: int
    offset: int
    length: int


@dataclass
class Reply:
    """The out header's unique and error, the body, and file data that follows the body."""

    unique: int
    error: int = 0  # a positive errno, or 0
    body: bytes = b""
    file_data: FileRange | None = None

    def header(self, data_length: int = 0) -> bytes:
        length = p.OUT_HEADER.size + len(self.body) + data_length
        return p.OUT_HEADER.pack(length, -self.error, self.unique)

    def to_bytes(self) -> bytes:
        """The whole reply, reading any file data with pread (for tests and small replies)."""
        data = b""
        if self.file_data is not None:
            data = os.pread(self.file_data.fd, self.file_data.length, self.file_data.offset)
        return self.header(len(data)) + self.body + data


class Deferred:
    """A reply that comes later (a read of input that has not arrived yet).

    The transport says where the reply goes with `then(callback)`; whoever
    has the answer calls `resolve(reply)`, from any thread, before or after.
    """

    def __init__(self) -> None:
        self.unique = 0
        self._lock = threading.Lock()
        self._callback: Callable[[Reply], object] | None = None
        self._reply: Reply | None = None

    def then(self, callback: Callable[[Reply], object]) -> None:
        with self._lock:
            self._callback = callback
            reply = self._reply
        if reply is not None:
            callback(reply)

    def resolve(self, error: int = 0, body: bytes = b"") -> None:
        reply = Reply(self.unique, error, body)
        with self._lock:
            self._reply = reply
            callback = self._callback
        if callback is not None:
            callback(reply)
