"""Patch distances -> anomaly maps in the 256 x 256 frame; calibrated and reference normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..core import defaults
from .patches import GRID
from .preprocess import FRAME

__all__ = ["NORMALISATIONS", "Calibration", "calibration_entry", "mean_of_k_nearest", "maps_from_scores", "normalise_maps", "image_scores"]

#: How distances become a map: the bank's normal calibration, or the reference code's min-max.
NORMALISATIONS: tuple[str, ...] = ("calibrated", "reference")


def mean_of_k_nearest(dist: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """A patch's score: the mean squared L2 distance to its ``k`` nearest bank patches (``dist``
    holds each patch's sorted distances along ``axis``, at least ``k`` of them)."""
    axis = axis % dist.ndim
    return dist[(slice(None),) * axis + (slice(0, k),)].mean(axis=axis)


@dataclass(frozen=True)
class Calibration:
    """Scale of normal anomaly maps, measured on held-out normal slices when the bank was built.

    ``low``: median map value of normal tissue; ``high``: the 99th percentile, over held-out
    normal slices, of each slice's maximum map value. A calibrated map is
    ``max(0, (m - low) / (high - low))``: about 0 on normal tissue, 1 at the strongest normal
    response, above 1 where no normal slice ever reached.
    """

    low: float
    high: float

    def apply(self, maps: np.ndarray) -> np.ndarray:
        span = max(self.high - self.low, 1e-12)
        return np.clip((maps - self.low) / span, 0.0, None).astype(np.float32)


def calibration_entry(calibration: dict | None, k: int) -> dict | None:
    """The entry of a bank's calibration (``manifest["calibration"]``) that serves ``k``: its own
    (banks store k = 1 to 5); else the largest stored k below ``k``; else the smallest stored.
    ``None`` when the bank holds no calibration. The one rule for every reader of the entry: the
    normalisation, the regions' levels, the slice decision and the count of normal peaks."""
    per_k = (calibration or {}).get("per_k") or {}
    if not per_k:
        return None
    if str(k) in per_k:
        return per_k[str(k)]
    stored = sorted(int(x) for x in per_k)
    below = [x for x in stored if x <= k]
    return per_k[str(below[-1] if below else stored[0])]


def maps_from_scores(scores: np.ndarray | torch.Tensor, *, size: int = FRAME, sigma: float = defaults.SIGMA) -> np.ndarray:
    """(N, 32, 32) patch scores -> (N, size, size) maps: bilinear upsampling, then Gaussian sigma."""
    t = torch.as_tensor(np.asarray(scores, dtype=np.float32)).reshape(-1, 1, GRID, GRID)
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma > 0:
        up = ndimage.gaussian_filter(up, sigma=(0, sigma, sigma), mode="reflect")
    return up.astype(np.float32)


def image_scores(scores: np.ndarray) -> np.ndarray:
    """Image score of each slice: the maximum of its patch scores (reference definition)."""
    s = np.asarray(scores)
    return s.reshape(s.shape[0], -1).max(axis=1)


def normalise_maps(maps: np.ndarray, method: str, calibration: Calibration | None = None, *, valid: np.ndarray | None = None) -> np.ndarray:
    """``calibrated``: from the bank's normal statistics; ``reference``: min-max over ``maps``.

    ``valid`` (bool per slice) limits the reference min-max to slices that hold anatomy.
    """
    if method == "calibrated":
        if calibration is None:
            raise ValueError("calibrated normalisation needs the bank's calibration statistics")
        return calibration.apply(maps)
    if method == "reference":
        pool = maps if valid is None or not valid.any() else maps[valid]
        lo, hi = float(pool.min()), float(pool.max())
        if hi <= lo:
            return np.zeros_like(maps, dtype=np.float32)
        return np.clip((maps - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown normalisation {method!r}")
