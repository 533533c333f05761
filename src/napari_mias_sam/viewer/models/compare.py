"""Comparing a mask with a ground truth (no Qt): Dice of a slice, of the volume and the paper's
mean slice Dice, the false-positive / false-negative overlay, and their counts kept up to date
slice by slice.

A live update changes one slice's mask at a time; recounting the whole volume after each one
(what :func:`compare_with_gt` does) costs a pass over every
voxel per slice shown. :class:`DiceTracker` keeps each slice's ``|P & G|``, ``|P|`` and ``|G|``
(the counts :mod:`napari_mias_sam.evaluation.metrics` builds its Dice from) and recounts only the
slice that changed; the slice, volume and mean slice Dice then come from the counts, equal to
:func:`~napari_mias_sam.evaluation.metrics.dice`, :func:`~napari_mias_sam.evaluation.metrics.volume_dice`
and :func:`~napari_mias_sam.evaluation.metrics.slice_dice` of the same masks (a test checks it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...evaluation.metrics import dice, slice_dice, volume_dice

__all__ = ["DiceTracker", "compare_with_gt", "error_overlay", "error_slice", "FP", "FN"]

FP = 1  # label value of false positives in the error overlay
FN = 2  # label value of false negatives


def compare_with_gt(pred: np.ndarray, gt: np.ndarray, *, axis: int, s: int) -> dict[str, Any]:
    """Dice of one slice, of the whole volume, and the paper's mean slice Dice (lesion slices).

    ``pred`` and ``gt`` are same-shape 3D arrays (non-zero = foreground), ``axis`` the slicing
    axis and ``s`` the slice. A slice where both are empty has no Dice (NaN).
    """
    p = np.asarray(pred) != 0
    g = np.asarray(gt) != 0
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    ps, gs = np.take(p, s, axis=axis), np.take(g, s, axis=axis)
    sd = slice_dice(p, g, axis=axis)
    return {
        "slice": int(s),
        "slice_dice": dice(ps, gs, empty_value=float("nan")),
        "slice_has_lesion": bool(gs.any()),
        "volume_dice": volume_dice(p, g),
        "mean_slice_dice": sd["mean"],
        "lesion_slices": sd["n_slices"],
    }


def error_overlay(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """uint8 labels: :data:`FP` where predicted but not in the GT, :data:`FN` where missed."""
    p = np.asarray(pred) != 0
    g = np.asarray(gt) != 0
    out = np.zeros(p.shape, dtype=np.uint8)
    out[p & ~g] = FP
    out[~p & g] = FN
    return out


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
