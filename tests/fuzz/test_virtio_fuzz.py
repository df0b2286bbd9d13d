"""A hostile guest driver against every virtio device, through the virtio-mmio register page.

Each case builds one device (blk on a raw file, net on a fake backend,
console, rng, fs serving a small directory tree) behind its transport, sometimes brings it up the way Linux
does, then writes random descriptor tables and available rings (addresses
anywhere in or past guest RAM, any lengths and flags, loops, indirect
tables), and plays random register accesses: status changes, queue
selection and sizes, ring addresses, notifications of any queue, interrupt
acknowledgements, config space reads and writes, resets mid-flight.

Pass: no access raises, every read fits its size, the device's backing file
is the only host file written (fs serves its tree read-only: it stays as made). Seeded (tests/fuzzing.py).
"""

from __future__ import annotations

import struct

import pytest

from devices.virtio import mmio as r
from devices.virtio.blk import VirtioBlock
from devices.virtio.console import VirtioConsole
from devices.virtio.fs import VirtioFs
from devices.virtio.io_loop import IoLoop
from devices.virtio.net import VirtioNet
from devices.virtio.rng import VirtioRng
from tests.fuzzing import fuzz_cases, time_bound
from tests.unit.virtio_driver import MEMORY_SIZE, Buffer, FakeBackend, make_transport
from vmm.fuse import protocol as fuse
from vmm.fuse.server import FuseServer
from vmm.image.open import open_image

SUITE_CASES = 60
STEPS = 60
CASE_BOUND = 20.0
REGISTERS = [r.STATUS, r.QUEUE_SEL, r.QUEUE_NUM, r.QUEUE_READY, r.QUEUE_NOTIFY, r.INTERRUPT_ACK,
             r.DEVICE_FEATURES_SEL, r.DRIVER_FEATURES, r.DRIVER_FEATURES_SEL, r.QUEUE_DESC_LOW,
             r.QUEUE_DESC_HIGH, r.QUEUE_DRIVER_LOW, r.QUEUE_DRIVER_HIGH, r.QUEUE_DEVICE_LOW,
             r.QUEUE_DEVICE_HIGH, r.CONFIG_GENERATION]
# Queues a driver brings up, where more than one: net's rx/tx, console's port 0,
# fs's hiprio queue and its request queue.
QUEUES = {"net": 2, "console": 2, "fs": 2}


def build(kind: str, tmp_path):
    if kind == "blk":
        path = tmp_path / "disk.raw"
        path.write_bytes(bytes(1 << 20))
        image = open_image(str(path), "raw", readonly=False)
        return VirtioBlock(image), image.close
    if kind == "net":
        backend = FakeBackend()
        backend.incoming = [bytes(range(256)) * 6, b"", b"\xff" * 70000]
        return VirtioNet(backend, mac=b"\x52\x54\x00\x01\x02\x03", loop=object()), lambda: None
    if kind == "console":
        loop = IoLoop()  # not started: the transmit queue's interrupt decisions wait forever
        return VirtioConsole(lambda data: None, loop, room_available=lambda: None), loop.stop
    if kind == "fs":
        share = tmp_path / "share"
        if not share.exists():
            (share / "dir").mkdir(parents=True)
            (share / "dir" / "file").write_bytes(FS_TREE["dir/file"])
            (share / "link").symlink_to("/etc/passwd")
        device = VirtioFs(FuseServer(str(share), readonly=True), "share")
        return device, device.close
    return VirtioRng(source=lambda n: bytes(n)), lambda: None


FS_TREE = {"dir": None, "dir/file": b"x" * 5000, "link": "/etc/passwd"}


def tree_state(root) -> dict:
    """Relative path -> file bytes, symlink target or None (a directory)."""
    state = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        state[name] = (str(path.readlink()) if path.is_symlink() else
                       None if path.is_dir() else path.read_bytes())
    return state


FUSE_OPCODES = [value for name, value in vars(fuse).items()
                if name.isupper() and isinstance(value, int) and 0 < value < 64]


def send_fuse_request(queue, rng) -> None:
    """A chain shaped as Linux's virtio_fs sends it (FUSE header and arguments readable, reply
    writable) with a random opcode, node, length field and arguments, so that the FUSE server is
    reached; INIT now and then with a valid body, so later requests find a session."""
    if rng.random() < 0.15:
        opcode, body = fuse.INIT, fuse.INIT_IN.pack(7, 31, 65536, 0) + bytes(48)
    else:
        opcode, body = rng.choice(FUSE_OPCODES), rng.randbytes(rng.randrange(0, 200))
    length = fuse.IN_HEADER.size + len(body) + rng.choice([0, 0, 0, -5, 7, rng.getrandbits(32)])
    nodeid = rng.choice([fuse.ROOT_ID, 2, 3, rng.getrandbits(64)])
    header = fuse.IN_HEADER.pack(length & 0xFFFF_FFFF, opcode, rng.getrandbits(64), nodeid, 0, 0, 0, 0, 0)
    heap = queue.driver.heap
    request = header + body
    reply_room = rng.choice([0, 8, 16, 512, 4096])
    buffers = [Buffer(heap.alloc(len(request), data=request), len(request))]
    if reply_room:
        buffers.append(Buffer(heap.alloc(reply_room), reply_room, writable=True))
    queue.add(buffers, indirect=rng.random() < 0.3)


def hostile_value(rng, heap_queues) -> int:
    return rng.choice([0, 1, 2, 0xFF, 0x100, 0x8000, 0xFFFF, 0xFFFF_FFFF, rng.getrandbits(32),
                       rng.randrange(MEMORY_SIZE), *heap_queues])


def scribble_rings(memory, queue, rng) -> None:
    """Random descriptors (some pointing at real buffers or at the table itself) and a random avail ring."""
    for index in range(queue.size):
        address = rng.choice([0x20_0000 + 4096 * index, queue.desc, rng.getrandbits(64), MEMORY_SIZE - 8,
                              rng.randrange(MEMORY_SIZE)])
        length = rng.choice([0, 1, 16, 4096, 0xFFFF_FFFF, rng.getrandbits(32)])
        memory.write(queue.desc + 16 * index, struct.pack("<QIHH", address, length, rng.getrandbits(3),
                                                           rng.randrange(queue.size + 2)))
    heads = [rng.randrange(queue.size + 2) for _ in range(rng.randint(1, queue.size))]
    for slot, head in enumerate(heads):
        memory.write_u16(queue.avail + 4 + 2 * (slot % queue.size), head)
    memory.write_u16(queue.avail + 2, rng.choice([len(heads), rng.getrandbits(16)]))


@pytest.mark.parametrize("kind", ["blk", "net", "console", "rng", "fs"])
def test_a_hostile_driver_never_breaks_a_device(kind, tmp_path):
    for label, rng in fuzz_cases(f"virtio-{kind}", SUITE_CASES):
        device, close = build(kind, tmp_path)
        transport, driver, memory, _ = make_transport(device)
        try:
            with time_bound(CASE_BOUND, label):
                queues = []
                if rng.random() < 0.7:
                    queues = driver.start(QUEUES.get(kind, 1), size=rng.choice([1, 8, 64]))
                for queue in queues:
                    scribble_rings(memory, queue, rng)
                addresses = [q.desc for q in queues] + [q.avail for q in queues] + [q.used for q in queues]
                for step in range(STEPS):
                    if rng.random() < 0.2:
                        offset, size = r.CONFIG + rng.randrange(0, 64), rng.choice([1, 2, 4, 8])
                    elif rng.random() < 0.1:  # anywhere in the register page, even unaligned
                        offset, size = rng.randrange(0, r.CONFIG), rng.choice([1, 2, 4])
                    else:
                        offset, size = rng.choice(REGISTERS), 4
                    if rng.random() < 0.3:
                        value = transport.read(offset, size)
                        assert 0 <= value < 1 << (8 * size), f"{label}, step {step}: read {offset:#x}"
                    else:
                        transport.write(offset, size, hostile_value(rng, addresses) & ((1 << (8 * size)) - 1))
                    if queues and rng.random() < 0.1:
                        scribble_rings(memory, rng.choice(queues), rng)
                    if kind == "fs" and queues and rng.random() < 0.3:
                        send_fuse_request(rng.choice(queues), rng)
                    if kind == "net" and rng.random() < 0.05:
                        device.backend.ready()  # the backend has packets: the device takes them if it can
        except AssertionError:
            raise
        except Exception as err:  # noqa: BLE001 - a guest must never make the VMM raise
            pytest.fail(f"{label}: {err!r}")
        finally:
            close()
            memory.close()
    if kind == "fs":  # read-only: the guest changed nothing on the host
        assert tree_state(tmp_path / "share") == FS_TREE
