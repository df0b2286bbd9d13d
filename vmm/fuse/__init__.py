"""An in-process FUSE server: host directory trees served to a guest over virtio-fs.

    protocol.py   the wire format of include/uapi/linux/fuse.h (structures, opcodes, flags)
    request.py    a request's bytes as the server reads them, and the reply it hands back
    session.py    requests parsed, checked and dispatched; errors turned into replies
    nodes.py      node IDs and file handles: what the server handed out, and nothing else
    server.py     one share: each FUSE operation carried out on the host through fds
"""
