"""The viewer's per-slice Dice counts (viewer/models/compare.py) give what the metrics give
for the same masks, after any sequence of slice updates."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mias_sam.evaluation.metrics import dice, slice_dice, volume_dice
from napari_mias_sam.viewer.models.compare import DiceTracker, error_slice
from napari_mias_sam.viewer.models.compare import FN, FP, compare_with_gt, error_overlay


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_counts_follow_slice_updates(axis):
    rng = np.random.default_rng(axis)
    shape = (7, 9, 11)
    gt = rng.random(shape) < 0.2
    np.moveaxis(gt, axis, 0)[2] = False  # a lesion-free slice
    pred = (rng.random(shape) < 0.25).astype(np.uint8)
    tr = DiceTracker(pred, gt, axis=axis)
    for step in range(12):
        s = int(rng.integers(0, shape[axis]))
        new = (rng.random(np.take(pred, 0, axis=axis).shape) < rng.random()).astype(np.uint8) if step % 3 else 0 * np.take(pred, 0, axis=axis)
        idx = [slice(None)] * 3
        idx[axis] = s
        pred[tuple(idx)] = new
        tr.update(s, new)
        ref = compare_with_gt(pred, gt, axis=axis, s=s)
        got = tr.summary(s)
        assert got["volume_dice"] == pytest.approx(volume_dice(pred, gt)) == pytest.approx(ref["volume_dice"])
        mean, n = tr.mean_slice_dice()
        sd = slice_dice(pred != 0, gt, axis=axis)
        assert n == sd["n_slices"] and mean == pytest.approx(sd["mean"])
        want = dice(np.take(pred, s, axis=axis), np.take(gt, s, axis=axis), empty_value=float("nan"))
        assert (np.isnan(want) and np.isnan(got["slice_dice"])) or got["slice_dice"] == pytest.approx(want)
        assert got["slice_has_lesion"] == ref["slice_has_lesion"]
        np.testing.assert_array_equal(error_slice(new, np.take(gt, s, axis=axis), FP, FN),
                                      np.take(error_overlay(pred, gt), s, axis=axis))


def test_empty_volumes_and_a_shape_mismatch():
    z = np.zeros((3, 4, 5), bool)
    tr = DiceTracker(z, z, axis=2)
    assert tr.volume_dice() == 1.0 and np.isnan(tr.mean_slice_dice()[0]) and np.isnan(tr.slice_dice(0))
    with pytest.raises(ValueError, match="differ in shape"):
        DiceTracker(z, np.zeros((3, 4, 6), bool), axis=2)
