"""Errors that reach the user as one line on stderr.

Anything raised as a `PyvmmError` is printed by the CLI as `pyvmm: <message>`
and turned into a non-zero exit status, never a traceback. Raise it for bad
user input and for host-side problems the user can act on; let genuine bugs
surface as ordinary exceptions.
"""


class PyvmmError(Exception):
    """A failure the user can understand and act on; the message is one line."""

    exit_status = 1


class GuestMemoryError(PyvmmError):
    """A guest-physical access fell outside guest RAM."""
