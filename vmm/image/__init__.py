"""Disk images: raw and qcow2, used by virtio-blk and by `pyvmm img`."""
