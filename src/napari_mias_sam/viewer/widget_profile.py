"""A small per-slice anomaly-score profile: one bar per slice, the current slice outlined,
ground-truth lesion slices ticked; clicking a bar jumps to that slice."""

from typing import Optional

import numpy as np
from qtpy.QtCore import QRectF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["ProfilePlot"]


class ProfilePlot(QWidget):
    """Bars of per-slice image scores. ``slice_clicked(int)`` is emitted on a click."""

    slice_clicked = Signal(int)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.scores = np.zeros(0)
        self.foreground = np.zeros(0, bool)
        self.lesion = None  # bool per slice, from the ground truth
        self.current = -1
        self.threshold = None
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setToolTip("Per-slice anomaly score (max patch distance). Click a bar to go to that slice; "
                        "ticks below mark ground-truth lesion slices.")

    def set_data(self, scores, foreground=None, threshold=None) -> None:
        self.scores = np.asarray(scores, dtype=float)
        self.foreground = np.ones(len(self.scores), bool) if foreground is None else np.asarray(foreground, bool)
        self.threshold = threshold
        self.update()

    def set_lesion(self, lesion) -> None:
        self.lesion = None if lesion is None else np.asarray(lesion, bool)
        self.update()

    def set_current(self, s: int) -> None:
        if s != self.current:
            self.current = int(s)
            self.update()

    def _bar_rect(self, i: int, n: int, top: float) -> QRectF:
        w = self.width() / max(n, 1)
        h = self.height() - 10
        return QRectF(i * w, 0, max(w - 1, 1), h)

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
            p.drawText(self.rect(), Qt.AlignCenter, "run MIAS-SAM to see the per-slice profile")
            p.end()
            return
        h = self.height() - 10
        w = self.width() / n
        top = float(np.nanmax(self.scores)) if np.isfinite(self.scores).any() else 1.0
        top = top if top > 0 else 1.0
        for i, v in enumerate(self.scores):
            frac = 0.0 if not np.isfinite(v) else max(0.0, v / top)
            bh = frac * (h - 2)
            color = QColor(240, 120, 40) if self.foreground[i] else QColor(90, 90, 90)
            p.fillRect(QRectF(i * w, h - bh, max(w - 1, 1), bh), color)
            if self.lesion is not None and i < len(self.lesion) and self.lesion[i]:
                p.fillRect(QRectF(i * w, h + 3, max(w - 1, 1), 5), QColor(60, 200, 255))
        if self.threshold is not None and np.isfinite(self.threshold):
            y = h - max(0.0, self.threshold / top) * (h - 2)
            p.setPen(QPen(QColor(200, 200, 200), 1, Qt.DashLine))
            p.drawLine(0, int(y), self.width(), int(y))
        if 0 <= self.current < n:
            p.setPen(QPen(QColor(255, 255, 255), 2))
            p.drawRect(QRectF(self.current * w, 1, max(w - 1, 1), h - 1))
        p.end()

    def mousePressEvent(self, event) -> None:  # noqa: N802
        pos = event.pos() if hasattr(event, "pos") else event.position()
        s = self.slice_at(pos.x())
        if s >= 0:
            self.slice_clicked.emit(s)
