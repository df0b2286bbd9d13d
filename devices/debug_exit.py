"""The debug-exit port: a guest stops the VM by writing its exit status.

Test guests (and CI guests) write one byte `v` to port 0xf4
(`PORT`) and pyvmm exits with status `v`. The device only
reports the request through an injected `stop(status=v)` callback; stopping
the vCPUs is the machine's business. Reads return all ones, like an empty
ISA port, so a probing guest sees nothing special.
"""

from __future__ import annotations

from collections.abc import Callable

from devices.board import Board


class DebugExit:
    def __init__(self, stop: Callable[..., None]) -> None:
        # Called as stop(status=v); keyword so the callback's meaning is explicit.
        self._stop = stop

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        # Only the low byte is the status: `out dx, ax` still means "exit with al".
        self._stop(status=value & 0xFF)


# -- where it sits --------------------------------------------------------------------

PORT = 0xF4  # QEMU's isa-debug-exit default


def plug(board: Board) -> DebugExit:
    debug_exit = DebugExit(lambda status: board.stop(status, ""))
    board.pio.register(PORT, 1, debug_exit, "debug-exit")
    return debug_exit
