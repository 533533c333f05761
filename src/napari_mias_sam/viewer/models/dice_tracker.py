"""Dice against a ground truth kept up to date slice by slice (no Qt).

A live update changes one slice's mask at a time; recounting the whole volume after each one
(what :func:`~napari_mias_sam.viewer.models.live.compare_with_gt` does) costs a pass over every
voxel per slice shown. :class:`DiceTracker` keeps each slice's ``|P & G|``, ``|P|`` and ``|G|``
(the counts :mod:`napari_mias_sam.evaluation.metrics` builds its Dice from) and recounts only the
slice that changed; the slice, volume and mean slice Dice then come from the counts, equal to
:func:`~napari_mias_sam.evaluation.metrics.dice`, :func:`~napari_mias_sam.evaluation.metrics.volume_dice`
and :func:`~napari_mias_sam.evaluation.metrics.slice_dice` of the same masks (a test checks it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DiceTracker", "error_slice"]


def error_slice(pred: np.ndarray, gt: np.ndarray, fp: int, fn: int) -> np.ndarray:
    """uint8 labels of one slice: ``fp`` where predicted but not in the ground truth, ``fn`` where missed."""
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    out = np.zeros(p.shape, np.uint8)
    out[p & ~g] = fp
    out[~p & g] = fn
    return out


class DiceTracker:
    """Per-slice overlap counts of a prediction and a binary ground truth along ``axis``.

    ``gt``: the ground truth's lesion mask (bool, 3D); ``pred``: the prediction (non-zero =
    foreground, same shape). :meth:`update` recounts one slice from its new 2D mask.
    """

    def __init__(self, pred: np.ndarray, gt: np.ndarray, *, axis: int) -> None:
        g = np.asarray(gt, dtype=bool)
        p = np.asarray(pred)
        if p.shape != g.shape:
            raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
        self.axis = int(axis)
        self.gt = g
        gs = np.moveaxis(g, self.axis, 0)
        ps = np.moveaxis(p, self.axis, 0) != 0
        sl = tuple(range(1, 3))
        self.n_g = np.count_nonzero(gs, axis=sl).astype(np.int64)
        self.n_p = np.count_nonzero(ps, axis=sl).astype(np.int64)
        self.inter = np.count_nonzero(ps & gs, axis=sl).astype(np.int64)

    @property
    def n_slices(self) -> int:
        return len(self.n_g)

    def gt_slice(self, s: int) -> np.ndarray:
        return np.take(self.gt, int(s), axis=self.axis)

    def update(self, s: int, pred_slice: np.ndarray) -> None:
        """Slice ``s`` now holds ``pred_slice`` (2D, non-zero = foreground)."""
        p = np.asarray(pred_slice) != 0
        g = self.gt_slice(s)
        self.n_p[s] = int(np.count_nonzero(p))
        self.inter[s] = int(np.count_nonzero(p & g))

    def slice_dice(self, s: int) -> float:
        """Dice of slice ``s`` (NaN when both are empty)."""
        d = int(self.n_p[s] + self.n_g[s])
        return float("nan") if d == 0 else 2.0 * int(self.inter[s]) / d

    def volume_dice(self) -> float:
        """3D Dice (1.0 when both volumes are empty)."""
        d = int(self.n_p.sum() + self.n_g.sum())
        return 1.0 if d == 0 else 2.0 * int(self.inter.sum()) / d

    def lesion_slices(self) -> np.ndarray:
        """bool per slice: the ground truth shows lesion there."""
        return self.n_g > 0

    def mean_slice_dice(self) -> tuple[float, int]:
        """The paper's mean slice Dice over the lesion slices and how many there are."""
        idx = np.flatnonzero(self.n_g > 0)
        if not idx.size:
            return float("nan"), 0
        per = [2.0 * int(self.inter[i]) / int(self.n_p[i] + self.n_g[i]) for i in idx]
        return float(np.mean(per)), int(idx.size)

    def summary(self, s: int) -> dict[str, Any]:
        """The figures :func:`~napari_mias_sam.viewer.models.live.compare_with_gt` returns."""
        mean, n = self.mean_slice_dice()
        return {"slice": int(s), "slice_dice": self.slice_dice(s), "slice_has_lesion": bool(self.n_g[s] > 0),
                "volume_dice": self.volume_dice(), "mean_slice_dice": mean, "lesion_slices": n}
