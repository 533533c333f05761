"""A plain stderr progress line for the command line (no extra dependency)."""

from __future__ import annotations

import sys
import time

__all__ = ["ConsoleProgress"]


class ConsoleProgress:
    """Callable ``(stage, done, total)``: redraws one line on a terminal, prints every ~10 %
    otherwise (logs, CI). Silent when ``enabled`` is false."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._stage = None
        self._last_pct = -1
        self._t0 = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self._stage:
            if self.tty and self._stage is not None:
                self.stream.write("\n")
            self._stage, self._last_pct, self._t0 = stage, -1, time.perf_counter()
        pct = int(100 * done / max(total, 1))
        elapsed = time.perf_counter() - self._t0
        line = f"  {stage}: {done}/{total} ({pct}%, {elapsed:.1f} s)"
        if self.tty:
            self.stream.write("\r" + line)
            if done >= total:
                self.stream.write("\n")
                self._stage = None
        elif pct // 10 > self._last_pct // 10 or done >= total:
            self.stream.write(line + "\n")
        self._last_pct = pct
        self.stream.flush()
