"""Virtio devices on the MMIO transport (virtio 1.x, "modern" virtio-mmio version 2).

    mmio.py        the transport: registers, feature negotiation, status, interrupts; where
                   the windows sit and their DSDT entries
    queue.py       split virtqueues: descriptor chains, checked against guest RAM
    device.py      what a device type implements (VirtioDevice) and is handed at activation
    blk.py net.py console.py rng.py      the device types
    blk_requests.py, blk_requests.c, blk_requests_build.py
                   virtio-blk's compiled request path, where built: a raw disk's
                   reads, writes and flushes carried out in C
    net_backends.py                      TAP and unix-socket packet backends
    io_loop.py     the I/O thread: one selectors loop for every device's fds
    irqfd_line.py  an interrupt line through a KVM irqfd (edges, no exit)

The machine builder uses vmm/virtio_setup.py, which puts these together on the board.
"""
