"""The demo's hello guest (tests/guest/asm/hello.S), built without an assembler.

`make demo` needs only what pyvmm needs at run time, so it cannot assemble
hello.S with GNU as (binutils is a test dependency). The 23 bytes of code
are spelled out here instead, one instruction a line, as GNU as encodes
hello.S; tests/guest/test_quick_start.py checks that the two stay the same.

    python -m tests.guest.hello_image OUTPUT     writes the flat image
"""

from __future__ import annotations

import sys
from pathlib import Path

from devices.debug_exit import PORT as DEBUG_EXIT_PORT
from devices.uart import COM1_PORT

MESSAGE = b"Hello from real mode\n\0"
EXIT_STATUS = 0x2A
CODE_SIZE = 0x17  # the message follows the code


def hello_image(status: int = EXIT_STATUS) -> bytes:
    """The image; `status`: what it writes to the debug-exit port (tests choose others)."""
    code = b"".join([
        b"\x8c\xc8",                                        # mov ax, cs
        b"\x8e\xd8",                                        # mov ds, ax
        b"\xbe" + CODE_SIZE.to_bytes(2, "little"),          # mov si, message
        b"\xba" + COM1_PORT.to_bytes(2, "little"),          # mov dx, 0x3f8
        b"\xac",                                            # next: lodsb
        b"\x84\xc0",                                        # test al, al
        b"\x74\x03",                                        # jz done
        b"\xee",                                            # out dx, al
        b"\xeb\xf8",                                        # jmp next
        b"\xb0" + bytes([status]),                          # done: mov al, 0x2a (the default status)
        b"\xe6" + bytes([DEBUG_EXIT_PORT]),                 # out 0xf4, al
        b"\xf4",                                            # hlt
    ])
    assert len(code) == CODE_SIZE
    return code + MESSAGE


if __name__ == "__main__":
    output = Path(sys.argv[1])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(hello_image())
