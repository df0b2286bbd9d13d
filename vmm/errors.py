"""Errors that reach the user as one line on stderr.

Anything raised as a `PyvmmError` is printed by the CLI as `pyvmm: <message>`
and turned into a non-zero exit status, never a traceback. Raise it for bad
user input and for host-side problems the user can act on; let genuine bugs
surface as ordinary exceptions.
"""

import os

# Control characters a file name (or a name read from an image) may hold,
# escaped so that a message stays one line on the user's terminal.
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F]} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def one_line(message: str) -> str:
    """`message` with control characters escaped: what the CLI prints after `pyvmm: `."""
    return message.translate(_CONTROL_ESCAPES)


def to_stderr(text: str) -> None:
    """Write `text` to stderr, or nothing when stderr itself is gone (`pyvmm ... 2>&1 | head`,
    head having exited): a message about a closed output must not end in a traceback."""
    data = text.encode(errors="replace")
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass


def report(message: str) -> None:
    """`pyvmm: <message>` as one line on stderr."""
    to_stderr(f"pyvmm: {one_line(message)}\n")


class PyvmmError(Exception):
    """A failure the user can understand and act on; the message is one line."""

    exit_status = 1


class GuestMemoryError(PyvmmError):
    """A guest-physical access fell outside guest RAM."""
