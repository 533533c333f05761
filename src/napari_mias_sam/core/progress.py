"""The two callbacks every long job takes, so compute code never knows who is watching:
``progress(stage, done, total)`` and ``cancelled() -> bool`` (the CLI prints, the widget moves
a progress bar and sets a flag)."""

from __future__ import annotations

from typing import Callable

__all__ = ["ProgressFn", "CancelFn", "counter"]

#: ``progress(stage, done, total)``: ``done`` of ``total`` units of ``stage`` are finished.
ProgressFn = Callable[[str, int, int], None]
#: ``cancelled() -> bool``: True once the user asked to stop (the job raises ``Cancelled``).
CancelFn = Callable[[], bool]


def counter(progress: ProgressFn | None, stage: str, total: int) -> Callable[[int], None]:
    """``advance(n)``: ``n`` more units of ``stage`` are done; reports the running count to ``progress``."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(stage, done, total)

    return advance
