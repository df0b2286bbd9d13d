"""Node IDs and file handles: the only names for host files the guest can use.

A node is a host inode the server found by a lookup (or created), held
through an O_PATH file descriptor: the fd keeps naming the same inode
whatever happens to its path, and needs no permission on the inode itself.
The guest refers to a node by the ID the server gave it, and the kernel
counts its lookups; FORGET gives them back, and at zero the node (and its
fd) goes. The same host inode found twice gets the same ID. IDs are never
reused while the server runs, so a stale ID the guest kept is simply
unknown: `get` refuses it with ESTALE rather than reaching some other file.

A file handle is an fd opened for I/O (OPEN, CREATE, OPENDIR), named by a
number the server gave out; RELEASE closes it.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from dataclasses import dataclass, field


class FuseError(Exception):
    """An operation failed with `errno`; the reply carries it to the guest."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


@dataclass
class Node:
    nodeid: int
    fd: int  # O_PATH | O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino) on the host
    mode: int  # the file type never changes, so it is safe to remember
    lookups: int = 0
    reader: int | None = None  # opened for reading on a read-only share's first READ

    def close(self) -> None:
        os.close(self.fd)
        if self.reader is not None:
            os.close(self.reader)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def proc_path(self) -> str:
        """A path that reopens this inode (never a symlink: callers check `is_symlink`)."""
        return f"/proc/self/fd/{self.fd}"


class NodeTable:
    def __init__(self, root_fd: int, root_id: int) -> None:
        st = os.fstat(root_fd)
        self.root = Node(root_id, root_fd, (st.st_dev, st.st_ino), st.st_mode, lookups=1)
        self._nodes: dict[int, Node] = {root_id: self.root}
        self._by_key: dict[tuple[int, int], Node] = {self.root.key: self.root}
        self._next_id = itertools.count(root_id + 1)

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, nodeid: int) -> Node:
        node = self._nodes.get(nodeid)
        if node is None:
            raise FuseError(errno.ESTALE)
        return node

    def add_lookup(self, fd: int, st: os.stat_result) -> Node:
        """Count one lookup of the inode `fd` names (an O_PATH fd this call takes over)."""
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is None:
            node = Node(next(self._next_id), fd, key, st.st_mode)
            self._nodes[node.nodeid] = node
            self._by_key[key] = node
        else:
            os.close(fd)  # the node keeps its own fd to the same inode
        node.lookups += 1
        return node

    def forget(self, nodeid: int, count: int) -> None:
        node = self._nodes.get(nodeid)
        if node is None or node is self.root:
            return  # nothing to give back (FORGET has no reply to carry an error)
        node.lookups -= min(count, node.lookups)
        if node.lookups == 0:
            del self._nodes[nodeid]
            del self._by_key[node.key]
            node.close()

    def close(self) -> None:
        for node in self._nodes.values():
            if node is not self.root:
                node.close()
        self._nodes = {self.root.nodeid: self.root}
        self._by_key = {self.root.key: self.root}


@dataclass
class Handle:
    fd: int
    node: Node
    writable: bool
    entries: list[tuple[bytes, int, int]] | None = field(default=None)  # a directory's listing


class HandleTable:
    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next = itertools.count(1)

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, handle: Handle) -> int:
        fh = next(self._next)
        self._handles[fh] = handle
        return fh

    def get(self, fh: int, nodeid: int | None = None) -> Handle:
        handle = self._handles.get(fh)
        if handle is None or (nodeid is not None and handle.node.nodeid != nodeid):
            raise FuseError(errno.EBADF)
        return handle

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            raise FuseError(errno.EBADF)
        os.close(handle.fd)

    def close(self) -> None:
        for handle in self._handles.values():
            os.close(handle.fd)
        self._handles.clear()
