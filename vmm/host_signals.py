"""The host's signals a command turns into an orderly stop (`pyvmm boot`/`run`, `pyvmm img`)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def handling(signals: tuple[signal.Signals, ...], handler: Callable) -> Iterator[None]:
    """`handler` for each of `signals` inside the block, the handlers from before after it.

    A signal ignored when pyvmm started stays ignored: under `nohup` pyvmm outlives its
    terminal (SIGHUP), and a shell's background job (`pyvmm boot ... &` in a script) is not
    stopped by the Ctrl-C meant for its foreground (SIGINT)."""
    previous = {sig: signal.signal(sig, handler) for sig in signals if signal.getsignal(sig) != signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
