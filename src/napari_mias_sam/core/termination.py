"""SIGTERM handled like SIGINT, and critical sections that a signal does not cut in two.

``timeout``, batch schedulers and ``docker stop`` send SIGTERM; Python's default is to die on the
spot, leaving temporary files behind. Inside :func:`handle_termination` SIGTERM (and SIGHUP) raise
:class:`Terminated`, a :class:`KeyboardInterrupt`, so every ``finally`` / ``except BaseException``
that cleans up after Ctrl-C runs for them too. Inside :func:`critical` (moving a finished set of
outputs into place) SIGINT and SIGTERM wait until the section ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["Terminated", "handle_termination", "critical"]

_HANDLED = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None), signal.SIGINT) if s is not None)
_depth = 0
_pending: int | None = None


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGINT, SIGTERM or SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def _handler(signum: int, _frame) -> None:
    global _pending
    if _depth > 0:
        _pending = signum  # raised when the critical section ends
        return
    raise Terminated(signum)


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """Within the block (main thread only; elsewhere a no-op), SIGINT/SIGTERM/SIGHUP raise
    :class:`Terminated`. The previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for s in _HANDLED:
        with contextlib.suppress(ValueError, OSError):
            old[s] = signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Defer SIGINT/SIGTERM (under :func:`handle_termination`) until the block ends."""
    global _depth, _pending
    main = threading.current_thread() is threading.main_thread()
    if main:
        _depth += 1
    try:
        yield
    finally:
        if main:
            _depth -= 1
            if _depth == 0 and _pending is not None:
                signum, _pending = _pending, None
                raise Terminated(signum)
