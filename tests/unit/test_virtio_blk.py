"""virtio-blk through the transport and a fake driver, on raw (and qcow2) images.

A raw disk's requests go through the compiled request path where it was
built (devices/virtio/blk_requests.py): the tests that take `request_path`
run through it and through the Python path; the others, which replace the
image's Python methods to see what the device does with them, through Python.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.virtio import blk
from devices.virtio import constants as c
from devices.virtio.blk import VirtioBlock
from tests.fuzzing import fuzz_settings
from tests.unit.virtio_driver import BlkDriver, Buffer, blk_requests, make_transport
from vmm.image.open import create_image, open_image

MiB = 1 << 20
DISK_SIZE = 4 * MiB


@pytest.fixture(autouse=True)
def python_requests():
    with blk_requests("python"):
        yield


@pytest.fixture(params=["compiled", "python"])
def request_path(request, python_requests):
    with blk_requests(request.param):
        yield request.param


@pytest.fixture
def raw_path(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return str(path)


@pytest.mark.parametrize("indirect", [False, True])
def test_write_then_read_back(request_path, raw_path, indirect):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image), indirect=indirect)
        payload = os.urandom(4096)
        assert d.request(blk.T_OUT, 8, out=payload)[0] == blk.S_OK
        status, data, used = d.request(blk.T_IN, 8, in_length=4096)
        assert (status, data, used) == (blk.S_OK, payload, 4097)
    with open(raw_path, "rb") as f:
        f.seek(8 * 512)
        assert f.read(4096) == payload


def test_config_space_describes_the_disk(raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image))
        assert d.config(0, 4) | d.config(4, 4) << 32 == DISK_SIZE // 512
        assert d.config(0x0C, 4) == blk.QUEUE_SIZE - 2  # seg_max
        assert d.config(0x14, 4) == 512  # blk_size
        assert d.config(0x24, 4) > 0 and d.config(0x28, 4) == 1  # discard limits
        features = d.driver.device_features()
        assert features & (1 << blk.F_FLUSH) and features & (1 << blk.F_DISCARD)
        assert not features & (1 << blk.F_RO)


def test_read_beyond_the_end_fails_the_request_only(request_path, raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image))
        last = DISK_SIZE // 512
        assert d.request(blk.T_IN, last - 1, in_length=1024)[0] == blk.S_IOERR
        assert d.request(blk.T_IN, 1 << 60, in_length=512)[0] == blk.S_IOERR
        assert d.request(blk.T_OUT, last, out=bytes(512))[0] == blk.S_IOERR
        assert d.request(blk.T_IN, 0, in_length=100)[0] == blk.S_IOERR  # not whole sectors
        assert d.request(blk.T_IN, last - 1, in_length=512)[0] == blk.S_OK
        assert not d.driver.status & c.STATUS_NEEDS_RESET


def test_read_only_disk_advertises_it_and_fails_writes(request_path, raw_path):
    with open(raw_path, "r+b") as f:
        f.write(b"original")
    with open_image(raw_path, "raw", readonly=True) as image:
        d = BlkDriver(VirtioBlock(image, serial="ro"))
        features = d.driver.device_features()
        assert features & (1 << blk.F_RO)
        assert not features & (1 << blk.F_DISCARD | 1 << blk.F_WRITE_ZEROES)
        assert d.request(blk.T_OUT, 0, out=bytes(512))[0] == blk.S_IOERR
        assert d.request(blk.T_IN, 0, in_length=512)[1][:8] == b"original"
        assert d.request(blk.T_FLUSH)[0] == blk.S_OK


def test_readonly_option_on_a_writable_image(request_path, raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image, readonly=True))
        assert d.request(blk.T_OUT, 0, out=b"x" * 512)[0] == blk.S_IOERR
    with open(raw_path, "rb") as f:
        assert f.read(1) == b"\0"


def test_flush_reaches_the_image(raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        flushes = []
        original = image.flush
        image.flush = lambda: (flushes.append(1), original())
        d = BlkDriver(VirtioBlock(image))
        assert d.request(blk.T_FLUSH)[0] == blk.S_OK
        assert flushes == [1]


def test_flush_calls_fdatasync_on_a_raw_image(raw_path, monkeypatch):
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image))
        assert d.request(blk.T_OUT, 3, out=b"y" * 512)[0] == blk.S_OK
        synced.clear()
        assert d.request(blk.T_FLUSH)[0] == blk.S_OK
        # Exactly one fdatasync, on the disk's own file, before the guest sees OK.
        assert len(synced) == 1
        assert os.fstat(synced[0]).st_ino == os.stat(raw_path).st_ino
        with open(raw_path, "rb") as f:
            f.seek(3 * 512)
            assert f.read(512) == b"y" * 512


def test_get_id_returns_the_serial_padded(request_path, raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image, serial="disk-0"))
        status, data, used = d.request(blk.T_GET_ID, in_length=20)
        assert status == blk.S_OK and data == b"disk-0" + bytes(14) and used == 21
        d2 = BlkDriver(VirtioBlock(image, serial="x" * 30))
        assert d2.request(blk.T_GET_ID, in_length=20)[1] == b"x" * 20


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


def test_write_zeroes_and_discard(request_path, raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image))
        d.request(blk.T_OUT, 0, out=b"\xaa" * 8192)
        assert d.request(blk.T_WRITE_ZEROES, out=segment(2, 4, 1))[0] == blk.S_OK
        data = d.request(blk.T_IN, 0, in_length=8192)[1]
        assert data == b"\xaa" * 1024 + bytes(2048) + b"\xaa" * (8192 - 3072)
        assert d.request(blk.T_DISCARD, out=segment(8, 8))[0] == blk.S_OK
        assert d.request(blk.T_DISCARD, out=segment(8, 8, flags=1))[0] == blk.S_UNSUPP
        assert d.request(blk.T_DISCARD, out=segment(DISK_SIZE // 512, 1))[0] == blk.S_IOERR
        assert d.request(blk.T_DISCARD, out=segment(0, 1) * 2)[0] == blk.S_UNSUPP  # max_discard_seg is 1
        assert d.request(blk.T_WRITE_ZEROES, out=b"short")[0] == blk.S_UNSUPP


def test_unknown_request_type_and_short_header(request_path, raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image))
        assert d.request(99)[0] == blk.S_UNSUPP
        heap = d.driver.heap
        header = heap.alloc(8)
        status = heap.alloc(1, data=b"\xff")
        d.queue.add([Buffer(header, 8), Buffer(status, 1, True)])
        d.queue.take_used()
        assert d.memory.read_u8(status) == blk.S_IOERR


def test_chain_without_status_byte_needs_reset(request_path, raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image))
        header = d.driver.heap.alloc(16, data=struct.pack("<IIQ", blk.T_IN, 0, 0))
        d.queue.add([Buffer(header, 16)])
        assert d.driver.status & c.STATUS_NEEDS_RESET


def test_host_io_error_becomes_ioerr(raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        def failing_transfer(offset, buffers):
            raise OSError(5, "Input/output error")

        image.read_into = image.write_from = failing_transfer
        d = BlkDriver(VirtioBlock(image))
        assert d.request(blk.T_IN, 0, in_length=512)[0] == blk.S_IOERR
        assert d.request(blk.T_OUT, 0, out=b"w" * 512)[0] == blk.S_IOERR
        assert d.transport.device.errors == 2


def test_a_host_io_error_on_the_compiled_path_fails_the_request_in_python(raw_path):
    # blk_requests.c leaves a request whose preadv/pwritev/fdatasync failed to Python, which
    # tries it once more and names the error: on a pipe all three fail.
    with blk_requests("compiled"), open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image))
        disk, (read_end, write_end) = os.dup(image.fileno()), os.pipe()
        os.dup2(read_end, image.fileno())
        os.close(read_end), os.close(write_end)
        assert d.request(blk.T_IN, 0, in_length=512)[0] == blk.S_IOERR
        assert d.request(blk.T_OUT, 0, out=b"w" * 512)[0] == blk.S_IOERR
        assert d.request(blk.T_FLUSH)[0] == blk.S_IOERR
        assert d.transport.device.errors == 3 and d.transport.device.requests == 3
        os.dup2(disk, image.fileno())  # the disk back, for the image's close
        os.close(disk)


@pytest.mark.parametrize("fails", [False, True])
def test_a_read_reports_its_data_and_status_byte_to_the_accelerator_at_once(raw_path, fails):
    # The software CPU drops code translated from what a device wrote: one report per
    # request, with the data (even what a failing read wrote) and the status byte.
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image), indirect=True)
        if fails:
            def half_then_error(offset, buffers):
                buffers[0][:256] = b"x" * 256
                raise OSError(5, "Input/output error")

            image.read_into = half_then_error
        reports = []
        d.memory.device_write_listener = lambda ranges: reports.append(sorted(ranges))
        status, _, _ = d.request(blk.T_IN, 8, in_length=1024)
    assert status == (blk.S_IOERR if fails else blk.S_OK)
    (_, length), status_byte = reports[0][0], reports[-1][-1]
    assert length == 1024 and status_byte[1] == 1 and d.memory.read_u8(status_byte[0]) == status
    assert len(reports) == (2 if fails else 1)  # a failing read reports its data before the status


def test_qcow2_image_through_the_image_library(tmp_path):
    path = str(tmp_path / "disk.qcow2")
    create_image(path, "qcow2", DISK_SIZE)
    with open_image(path, readonly=False) as image:
        d = BlkDriver(VirtioBlock(image))
        assert d.request(blk.T_OUT, 100, out=b"q" * 1024)[0] == blk.S_OK
        assert d.request(blk.T_FLUSH)[0] == blk.S_OK
    with open_image(path) as image:
        assert image.read(100 * 512, 1024) == b"q" * 1024


def test_event_idx_suppresses_interrupts_until_used_event(request_path, raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image))
        assert d.driver.features & (1 << c.F_EVENT_IDX)
        d.queue.set_used_event(1)  # interrupt when the second request is used
        d.request(blk.T_IN, 0, in_length=512)
        assert d.irq.edges == 0
        d.request(blk.T_IN, 0, in_length=512)
        assert d.irq.edges == 1
        d.driver.ack_interrupt()
        d.request(blk.T_IN, 0, in_length=512)
        assert d.irq.edges == 1
        # The device asked to be kicked for the next request.
        assert d.queue.avail_event == d.queue.avail_idx


def test_without_event_idx_every_request_interrupts(request_path, raw_path):
    with open_image(raw_path, "raw", readonly=False) as image:
        device = VirtioBlock(image)
        probe, _, _, _ = make_transport(VirtioBlock(image))
        accept = probe.device_features & ~(1 << c.F_EVENT_IDX)
        d = BlkDriver(device, accept=accept)
        for n in range(1, 4):
            d.request(blk.T_IN, 0, in_length=512)
            assert d.irq.edges == n
            d.driver.ack_interrupt()


@fuzz_settings(200)
@given(
    descriptors=st.lists(st.tuples(st.integers(0, (1 << 24) + 8192), st.integers(0, 1 << 16),
                                   st.integers(0, 7), st.integers(0, 20)), min_size=16, max_size=16),
    heads=st.lists(st.integers(0, 17), min_size=1, max_size=16),
    headers=st.lists(st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, (1 << 64) - 1)),
                     min_size=4, max_size=4),
)
def test_fuzz_blk_requests_never_break_the_vmm(request_path, raw_path, descriptors, heads, headers):
    with open_image(raw_path, "raw", readonly=False) as image:
        d = BlkDriver(VirtioBlock(image), accept=None)
        queue = d.queue
        base = 0x30_0000
        for i, (kind, sector) in enumerate(headers):
            d.memory.write(base + 64 * i, struct.pack("<IIQ", kind, 0, sector & ((1 << 64) - 1)))
        for i, (address, length, flags, following) in enumerate(descriptors):
            if address % 5 == 0:
                address = base + 64 * (address % 4)  # some point at real request headers
            queue.write_descriptor(i % queue.size, address, length, flags, following)
        for head in heads:
            queue.publish(head, kick=False)
        queue.kick()  # must not raise, whatever the outcome
        status = d.driver.status
        assert status & c.STATUS_DRIVER_OK
