"""Software CPU with two vCPUs: INIT/SIPI through the local APIC starts the AP in real
mode at the SIPI vector; both vCPUs take turns on the one engine, each on its own thread
(as the exit loop runs them), and a locked increment on shared memory is seen by both."""

from __future__ import annotations

import threading

from tests.unit.tcg_support import LOAD_ADDRESS, TcgMachine, assemble, long_mode_state
from vmm.exits import Interrupted

AP_START = 0x20000  # SIPI vector 0x20
COUNTER = 0x7000

AP = r"""
    .code16
    mov $'a', %al
    out %al, $0xe9
    xor %ax, %ax
    mov %ax, %ds
    mov $1000, %cx
1:  lock incl 0x7000                /* shared with the BSP */
    loop 1b
    cli
    hlt
"""

BSP = r"""
    .code64
    mov $0xFEE00000, %rdi
    movl $0x1FF, 0xF0(%rdi)         /* software-enable the local APIC */
    movl $(1 << 24), 0x310(%rdi)    /* to APIC ID 1 */
    movl $0x4500, 0x300(%rdi)       /* INIT */
    movl $(1 << 24), 0x310(%rdi)
    movl $0x4620, 0x300(%rdi)       /* SIPI, vector 0x20 */
    mov $1000, %ecx
1:  lock incl 0x7000
    loop 1b
2:  pause
    cmpl $2000, 0x7000              /* wait for the AP's increments too */
    jne 2b
    mov $'b', %al
    out %al, $0xe9
    mov $0, %al
    out %al, $0xf4
    hlt
"""


def test_init_sipi_starts_the_second_vcpu_and_memory_is_shared(tmp_path):
    machine = TcgMachine(cpus=2, irqchip=True)
    try:
        machine.memory.write(AP_START, assemble(AP, tmp_path, name="ap"))
        machine.memory.write(LOAD_ADDRESS, assemble(BSP, tmp_path, link_address=LOAD_ADDRESS, name="bsp"))
        machine.vcpus[0].set_state(long_mode_state(machine.memory, LOAD_ADDRESS))
        stop = threading.Event()
        exits = {}

        def loop(vcpu):
            while not stop.is_set():
                result = vcpu.run()
                if not isinstance(result, Interrupted):
                    exits[vcpu.index] = result
                    return

        threads = [threading.Thread(target=loop, args=(v,), daemon=True) for v in machine.vcpus]
        for thread in threads:
            thread.start()
        threads[0].join(20)
        stop.set()
        for vcpu in machine.vcpus:
            vcpu.kick()
        for thread in threads:
            thread.join(5)
        assert not any(thread.is_alive() for thread in threads)
        assert machine.exit.status == 0, bytes(machine.output.data)
        assert sorted(bytes(machine.output.data)) == sorted(b"ab")
        assert machine.memory.read_u32(COUNTER) == 2000
    finally:
        machine.close()
