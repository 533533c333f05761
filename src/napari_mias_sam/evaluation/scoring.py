"""Scoring helpers shared by the demo, ``segment --gt`` and ``evaluate``."""

from __future__ import annotations

import numpy as np

from ..core.defaults import BASELINE_THRESHOLD
from ..method.preprocess import Frame, from_frame

__all__ = ["cog_hits", "baseline_slices", "threshold_baseline_masks", "gt_metrics"]


def cog_hits(result, gt: np.ndarray) -> tuple[int, int]:
    """On slices whose ground truth holds a lesion: how often the prompt centre lies inside it."""
    gt_slices = np.moveaxis(gt, result.axis, 0)
    hits = n = 0
    for s in range(result.n_slices):
        if not gt_slices[s].any():
            continue
        n += 1
        for ijk in result.prompt_centres(s):  # one per region with the regions prompt: any inside counts
            idx = tuple(int(round(c)) for c in ijk)
            if all(0 <= idx[a] < gt.shape[a] for a in range(3)) and gt[idx]:
                hits += 1
                break
    return hits, n


def baseline_slices(maps: np.ndarray, foreground: np.ndarray, frame: Frame,
                    threshold: float = BASELINE_THRESHOLD) -> np.ndarray:
    """The thresholding baseline (the paper's, and the only one here): normalised frame maps
    (N, 256, 256) > ``threshold`` on the input's slice grid (N, H, W), slices without anatomy off."""
    per_slice = from_frame(maps, frame) > threshold
    per_slice[~foreground] = False
    return per_slice


def threshold_baseline_masks(maps: np.ndarray, foreground: np.ndarray, frame: Frame, axis: int,
                             threshold: float = BASELINE_THRESHOLD) -> np.ndarray:
    """:func:`baseline_slices` as a volume on the input's voxel grid (slices along ``axis``)."""
    return np.ascontiguousarray(np.moveaxis(baseline_slices(maps, foreground, frame, threshold), 0, axis))


def gt_metrics(result, gt: np.ndarray) -> dict:
    """Slice Dice (paper definition), volume Dice and CoG hits of a result against ``gt`` (bool)."""
    from .metrics import slice_dice, volume_dice

    pred = result.mask_volume() > 0
    sd = slice_dice(pred, gt, axis=result.axis)
    hits, n = cog_hits(result, gt)
    return {
        "slice_dice": sd["mean"],
        "per_slice_dice": {int(k): float(v) for k, v in sd["per_slice"].items()},
        "volume_dice": volume_dice(pred, gt),
        "cog_inside_lesion": {"hits": hits, "lesion_slices": n},
        "lesion_slices": n,
    }
