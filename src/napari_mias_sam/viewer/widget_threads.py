"""Background jobs for the widget: a napari thread worker with a progress relay and a cancel flag.

User errors (:class:`~napari_mias_sam.core.errors.MiasSamError`, ``ValueError``) raised by the job are
returned as :class:`Failed` and shown as one-line notifications, never as tracebacks; anything
else is a bug and goes to napari's error notification with its traceback.
"""

import sys
import threading
import time
from typing import Callable, Optional

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal

from ..core.errors import MiasSamError

__all__ = ["Failed", "Job", "start_generator", "avoid_triton_llvm_crash", "PROGRESS_INTERVAL_S"]

#: Shortest time between two progress reports of one stage shown in the dock.
PROGRESS_INTERVAL_S = 0.2


class Failed:
    """What a job returns instead of raising a user error."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __repr__(self) -> str:
        return f"Failed({self.exc!r})"


class _Relay(QObject):
    """Lives in the GUI thread; a signal emitted from the worker thread is queued to it."""

    progressed = Signal(str, int, int)


class Job:
    """Run ``func(progress=..., cancelled=...)`` in a thread worker.

    ``on_done(value)`` gets the return value or a :class:`Failed`; ``on_progress(stage, done,
    total)`` is called in the GUI thread; ``on_finished()`` always runs last.
    """

    def __init__(
        self,
        func: Callable,
        *,
        on_done: Callable,
        on_progress: Optional[Callable] = None,
        on_finished: Optional[Callable] = None,
    ) -> None:
        self.cancel_event = threading.Event()
        self.relay = _Relay()
        if on_progress is not None:
            self.relay.progressed.connect(on_progress)
        self._on_done = on_done
        self._on_finished = on_finished
        self._last: tuple = ("", 0.0)  # stage and time of the last progress report shown
        self.done = False

        def run():
            try:
                return func(progress=self._progress, cancelled=self.cancel_event.is_set)
            except (MiasSamError, ValueError) as exc:
                return Failed(exc)

        self.worker = create_worker(run, _start_thread=False, _ignore_errors=True)
        self.worker.returned.connect(self._on_done)
        self.worker.finished.connect(self._finished)

    def _progress(self, stage: str, done: int, total: int) -> None:
        # Each report repaints the dock (and, with a GL canvas, the whole window): at most
        # PROGRESS_INTERVAL_S apart, except a new stage and a stage's end.
        now = time.monotonic()
        if stage == self._last[0] and done < total and now - self._last[1] < PROGRESS_INTERVAL_S:
            return
        self._last = (stage, now)
        self.relay.progressed.emit(str(stage), int(done), int(total))

    def _finished(self) -> None:
        self.done = True
        if self._on_finished is not None:
            self._on_finished()

    def start(self) -> "Job":
        self.worker.start()
        return self

    def cancel(self) -> None:
        # Only the flag: the job's ``cancelled()`` checks make it raise Cancelled, which comes back
        # as a Failed value (worker.quit() would also suppress that return value).
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


def start_generator(gen_func: Callable, *args, on_yield: Callable, on_finished: Optional[Callable] = None):
    """Run a generator function in a thread worker; ``on_yield`` gets each value in the GUI thread."""
    worker = create_worker(gen_func, *args, _start_thread=False, _ignore_errors=True)
    worker.yielded.connect(on_yield)
    if on_finished is not None:
        worker.finished.connect(on_finished)
    worker.start()
    return worker


def avoid_triton_llvm_crash() -> bool:
    """Keep torch from importing triton once a software OpenGL driver has loaded LLVM.

    napari's canvas on Mesa (llvmpipe: virtual displays, VMs, remote desktops) maps
    ``libLLVM`` into the process; importing triton afterwards (torchvision imports
    ``torch._dynamo``, which probes for triton) loads a second LLVM and crashes the process.
    MIAS-SAM never uses triton (no ``torch.compile``), so when LLVM is already mapped and
    triton is not yet imported, ``import triton`` is made to fail cleanly (torch then reports
    no triton). Returns True when it did so.
    """
    if "triton" in sys.modules:
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            llvm = any("libLLVM" in line for line in fh)
    except OSError:  # not Linux
        return False
    if llvm:
        sys.modules["triton"] = None  # type: ignore[assignment]
    return llvm
