"""A small per-slice anomaly-score profile: one bar per slice with slice numbers under it, the
current slice outlined, ground-truth lesion slices ticked, slices the slice decision dropped and
slices without anatomy greyed; clicking a bar jumps to that slice."""

from typing import Optional

import numpy as np
from qtpy.QtCore import QRectF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["ProfilePlot", "tick_slices"]

KEPT = QColor(240, 120, 40)  # a slice whose mask is kept
DROPPED = QColor(125, 125, 135)  # prompted, but the slice decision dropped its mask
EMPTY = QColor(70, 70, 70)  # no anatomy: never prompted
LESION = QColor(60, 200, 255)  # ground-truth lesion slice
AXIS_H = 14  # pixels under the bars for the slice numbers
TICK_H = 6  # pixels for the ground-truth ticks


def tick_slices(n: int, width_px: float, min_px: float = 34.0) -> list[int]:
    """Slice numbers to label on an axis of ``n`` slices ``width_px`` wide: a round step (1, 2, 5,
    10, 20, 50...) so that labels are at least ``min_px`` apart, always including 0."""
    if n <= 0:
        return []
    per = max(width_px / n, 1e-6)
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000):
        if step * per >= min_px:
            break
    return list(range(0, n, step))


class ProfilePlot(QWidget):
    """Bars of per-slice image scores. ``slice_clicked(int)`` is emitted on a click."""

    slice_clicked = Signal(int)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.scores = np.zeros(0)
        self.foreground = np.zeros(0, bool)
        self.dropped = np.zeros(0, bool)
        self.lesion = None  # bool per slice, from the ground truth
        self.current = -1
        self.threshold = None
        self.setMinimumHeight(96)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Per-slice anomaly score (max patch distance), slice numbers below. Orange: mask kept; "
                        "grey: dropped by the slice decision (dashed line: its threshold); dark: no anatomy. "
                        "Blue ticks: ground-truth lesion slices. Click a bar to go to that slice.")

    def set_data(self, scores, foreground=None, threshold=None, dropped=None) -> None:
        self.scores = np.asarray(scores, dtype=float)
        n = len(self.scores)
        self.foreground = np.ones(n, bool) if foreground is None else np.asarray(foreground, bool)
        self.dropped = np.zeros(n, bool) if dropped is None else np.asarray(dropped, bool)
        self.threshold = threshold
        self.update()

    def set_lesion(self, lesion) -> None:
        self.lesion = None if lesion is None else np.asarray(lesion, bool)
        self.update()

    def set_current(self, s: int) -> None:
        if s != self.current:
            self.current = int(s)
            self.update()

    def bar_color(self, i: int) -> QColor:
        if not self.foreground[i]:
            return EMPTY
        return DROPPED if self.dropped[i] else KEPT

    def slice_at(self, x: float) -> int:
        n = len(self.scores)
        if n == 0:
            return -1
        return int(np.clip(x / (self.width() / n), 0, n - 1))

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt name)
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(20, 20, 24))
        n = len(self.scores)
        if n == 0:
            p.setPen(QColor(150, 150, 150))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "run MIAS-SAM to see the per-slice profile")
            p.end()
            return
        h = self.height() - AXIS_H - TICK_H - 2  # bar area
        w = self.width() / n
        top = float(np.nanmax(self.scores)) if np.isfinite(self.scores).any() else 1.0
        top = top if top > 0 else 1.0
        for i, v in enumerate(self.scores):
            frac = 0.0 if not np.isfinite(v) else max(0.0, v / top)
            bh = frac * (h - 2)
            p.fillRect(QRectF(i * w, h - bh, max(w - 1, 1), bh), self.bar_color(i))
            if self.lesion is not None and i < len(self.lesion) and self.lesion[i]:
                p.fillRect(QRectF(i * w, h + 1, max(w - 1, 1), TICK_H - 1), LESION)
        if self.threshold is not None and np.isfinite(self.threshold):
            y = h - max(0.0, self.threshold / top) * (h - 2)
            p.setPen(QPen(QColor(200, 200, 200), 1, Qt.PenStyle.DashLine))
            p.drawLine(0, int(y), self.width(), int(y))
        # The slice axis: numbers under their bars.
        p.setPen(QColor(170, 170, 170))
        font = p.font()
        font.setPointSizeF(max(6.0, font.pointSizeF() * 0.8))
        p.setFont(font)
        y0 = h + TICK_H
        for s in tick_slices(n, self.width()):
            cx = (s + 0.5) * w
            p.drawLine(int(cx), y0, int(cx), y0 + 2)
            p.drawText(QRectF(cx - 20, y0 + 1, 40, AXIS_H), Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop, str(s))
        if 0 <= self.current < n:
            p.setPen(QPen(QColor(255, 255, 255), 2))
            p.drawRect(QRectF(self.current * w, 1, max(w - 1, 1), h - 1))
        p.end()

    def mousePressEvent(self, event) -> None:  # noqa: N802
        pos = event.position() if hasattr(event, "position") else event.pos()
        s = self.slice_at(pos.x())
        if s >= 0:
            self.slice_clicked.emit(s)
