"""SIGTERM handled like Ctrl-C, and short critical sections that a signal cannot split.

A CI cancel or a plain `kill` sends SIGTERM, whose default action ends the process on the spot: no `finally`
runs and temporary folders stay behind. Raising `Terminated` (a KeyboardInterrupt) instead unwinds the same
clean-up paths as Ctrl-C does.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, Optional

SIGTERM_EXIT = 128 + signal.SIGTERM  # what shells report for a process ended by SIGTERM
SIGINT_EXIT = 128 + signal.SIGINT


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; unwinds like KeyboardInterrupt so every clean-up runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (the previous handler comes back after)."""
    if not _main_thread():  # signal handlers can only be set from the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        _restore(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done (a few renames that must not be split), then deliver it."""
    if not _main_thread():
        yield
        return
    caught: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            _restore(s, handler)
        pending: Optional[int] = caught[0] if caught else None
        if pending is not None:
            signal.raise_signal(pending)


def _restore(sig: int, handler: Any) -> None:
    """Put back a handler `signal.signal` returned (None: one set outside Python, restored as the default)."""
    signal.signal(sig, signal.SIG_DFL if handler is None else handler)
