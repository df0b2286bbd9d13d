"""Disk images: raw and qcow2, used by virtio-blk and by `pyvmm img`.

For a device model, the whole interface is:

    from vmm.image import open_image, ImageError

    disk = open_image("disk.qcow2", readonly=False)   # format probed, backing chain opened
    disk.size                    # bytes; fixed while open
    disk.readonly                # True if opened read-only
    disk.read(offset, length)    # -> bytes
    disk.write(offset, data)
    disk.write_zeroes(offset, length)   # afterwards reads as zeros
    disk.discard(offset, length)        # hint; the range then reads as old data or zeros
    disk.flush()                 # durable: everything written before survives a crash
    disk.close()                 # flushes; also closes the backing chain

Every method is thread-safe. Every failure is an `ImageError` (a
`PyvmmError` with a one-line message): `ImageRangeError` for accesses
outside the disk, `ReadOnlyImageError`, `CorruptImageError` for bad
metadata (nothing is written then), `UnsupportedImageError` for features
this library refuses (encryption, external data files, subclusters).
A virtio-blk device should turn them into VIRTIO_BLK_S_IOERR for that
request and keep running. The contract is spelled out in `base.py`; the
crash-consistency rules of qcow2 writes in `qcow2_write.py`.

Modules: base (interface), raw, qcow2 (the image object; + qcow2_write,
qcow2_refcounts, qcow2_format, qcow2_tables, qcow2_create, qcow2_check,
compression), open (probing, backing chains, atomic creation), convert
(convert, compare), info, sizes, cli.
"""

__all__ = [
    "BlockDevice",
    "CorruptImageError",
    "Extent",
    "ImageError",
    "ImageRangeError",
    "ReadOnlyImageError",
    "UnsupportedImageError",
    "create_image",
    "open_image",
]


def __getattr__(name: str):
    # Each name is imported on first use, from base or (opening and creating
    # images: qcow2 and the rest of the library) open, so that `pyvmm boot`
    # without a disk loads none of it: it reads --memory with vmm.image.sizes.
    if name in ("create_image", "open_image"):
        from vmm.image import open as module
    elif name in __all__:
        from vmm.image import base as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
