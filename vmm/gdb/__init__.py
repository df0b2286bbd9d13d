"""A gdb remote stub: debug the guest with the real gdb (`pyvmm boot -s -S`, `target remote :1234`).

    packets.py    framing: $payload#checksum, acks, the interrupt byte
    session.py    one connection's commands -> replies, on a Target
    target.py     what the session needs from the thing it debugs
    registers.py  the x86-64 register set and its target description
    debugger.py   the VM as a Target: all-stop control of the vCPU threads, memory through page tables
    server.py     the socket and the thread that serves it
    options.py    --gdb, -s, -S as click options
"""
