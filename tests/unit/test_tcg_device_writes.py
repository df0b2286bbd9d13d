"""Device writes into guest RAM drop the software CPU's translations of the code they overwrite."""

from __future__ import annotations

import struct
import threading

import pytest

from devices.virtio import blk
from devices.virtio.blk import VirtioBlock
from devices.virtio.mmio import VirtioMmioTransport
from devices.virtio.queue import DescriptorChain
from tests.unit.tcg_support import LOAD_ADDRESS, TcgMachine, assemble
from tests.unit.virtio_driver import Buffer, FakeDriver, blk_requests
from vmm.bus import NullIrqLine
from vmm.cpu_state import CpuState
from vmm.image.open import open_image

PRINT_AND_EXIT = """
    .code16
    mov ${letter}, %al
    out %al, $0xe9
    mov $0x2a, %al
    out %al, $0xf4
    hlt
"""


def run_from_the_start(machine) -> bytes:
    machine.exit.status = None
    machine.output.data.clear()
    machine.vcpus[0].set_state(CpuState.real_mode(LOAD_ADDRESS >> 4, 0))
    machine.run()
    return bytes(machine.output.data)


def test_a_device_write_from_another_thread_replaces_code_that_ran(machine, tmp_path):
    images = {letter: assemble(PRINT_AND_EXIT.format(letter=hex(ord(letter))), tmp_path, name=letter)
              for letter in "ABC"}
    machine.load(images["A"])
    assert run_from_the_start(machine) == b"A"

    # Written behind the engine's back (as a loader would): the translation of A stays.
    machine.memory.write(LOAD_ADDRESS, images["B"])
    assert run_from_the_start(machine) == b"A"

    # Written by a device on the I/O thread (into a buffer the guest gave it):
    # queued, dropped before the next slice.
    chain = DescriptorChain(0, writable=[(LOAD_ADDRESS, 0x1000)])
    writer = threading.Thread(target=chain.write, args=(machine.memory, images["C"]))
    writer.start()
    writer.join()
    assert machine.vm.invalidator.invalidations == 0
    assert run_from_the_start(machine) == b"C"
    assert machine.vm.invalidator.invalidations == 1


def test_adjacent_ranges_are_one_call_and_ranges_are_clipped_to_ram(tmp_path):
    m = TcgMachine(memory_size=0xC000_0000 + (16 << 20))  # low RAM up to the hole, 16M above 4G
    try:
        invalidator = m.vm.invalidator
        invalidator.start_owning()
        invalidator.devices_wrote([(0x10000, 0x1000), (0x11000, 0x200), (0x11200, 0xE00), (0x20000, 0x1000)])
        assert invalidator.invalidations == 2
        invalidator.devices_wrote([(0xBFFF_F000, 0x4000_2000)])  # the end of low RAM, the hole, high RAM
        assert invalidator.invalidations == 4
        invalidator.devices_wrote([(0xD000_0000, 0x1000)])  # the hole only
        assert invalidator.invalidations == 4
        # A user buffer's pages, adjacent but handed over in descending order (as
        # Linux's page allocator gives them), some overlapping: still one run.
        invalidator.devices_wrote([(0x33000, 0x1000), (0x32000, 0x1000), (0x31800, 0x1000), (0x30000, 0x1800)])
        assert invalidator.invalidations == 5
    finally:
        invalidator.stop_owning()
        m.close()


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_a_disk_read_over_code_that_ran_replaces_it_on_either_request_path(machine, tmp_path, path):
    """virtio-blk reading a program over one that ran, on the vCPU's thread (as in its MMIO
    hook): the next run is the new program. The compiled path tells the engine itself
    (GuestMemory.native_write_listener), not through Python's invalidator."""
    images = {letter: assemble(PRINT_AND_EXIT.format(letter=hex(ord(letter))), tmp_path, name=letter)
              for letter in "AB"}
    machine.load(images["A"])
    assert run_from_the_start(machine) == b"A"
    disk = tmp_path / "disk.raw"
    disk.write_bytes(images["B"].ljust(4096, b"\0"))
    image = open_image(str(disk), "raw", readonly=True)
    transport = VirtioMmioTransport(VirtioBlock(image), machine.memory, NullIrqLine())
    driver = FakeDriver(transport, machine.memory)
    driver.heap.next = 0x100_0000  # (the queue and the request's header far from the program)
    invalidator = machine.vm.invalidator
    try:
        with blk_requests(path):
            (queue,) = driver.start(1)
        header = driver.heap.alloc(16, data=struct.pack("<IIQ", blk.T_IN, 0, 0))
        status = driver.heap.alloc(1, data=b"\xff")
        invalidator.start_owning()  # this thread is the vCPU's, between two slices
        try:
            queue.add([Buffer(header, 16), Buffer(LOAD_ADDRESS, 4096, writable=True), Buffer(status, 1, writable=True)])
        finally:
            invalidator.stop_owning()
        assert machine.memory.read_u8(status) == blk.S_OK
        assert (invalidator.invalidations == 0) == (path == "compiled")
        assert run_from_the_start(machine) == b"B"
    finally:
        transport.close()
