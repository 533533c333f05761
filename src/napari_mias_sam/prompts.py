"""Threshold-free prompts from an anomaly map: centre of gravity (point or moment box), maximum
point, and the paper's thresholded-box ablation. Coordinates are (x = column, y = row)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .backbones.base import Prompt

__all__ = ["centre_of_gravity", "cog_point", "cog_box", "max_point", "threshold_boxes", "make_prompt"]


def _weights(amap: np.ndarray, gamma: float) -> np.ndarray | None:
    m = np.asarray(amap, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"anomaly map must be 2D, got shape {m.shape}")
    if not np.isfinite(m).all():
        return None
    m = np.clip(m, 0.0, None)
    top = m.max()
    if top <= 0:
        return None
    # I^gamma / sum(I^gamma) is unchanged by scaling I, so divide by the max first (no overflow).
    w = (m / top) ** gamma
    total = w.sum()
    return w / total if total > 0 else None


def centre_of_gravity(amap: np.ndarray, gamma: float = 5.0) -> tuple[float, float] | None:
    """Eq. 2 of the paper: x_c = sum(j I^g) / sum(I^g), y_c = sum(i I^g) / sum(I^g).

    Returns ``None`` for an all-zero, negative-only or non-finite map (no prompt for that slice).
    """
    w = _weights(amap, gamma)
    if w is None:
        return None
    rows, cols = np.indices(w.shape)
    return float((w * cols).sum()), float((w * rows).sum())


cog_point = centre_of_gravity


def cog_box(amap: np.ndarray, gamma: float = 5.0, *, n_sigma: float = 2.0, min_side: float = 4.0) -> tuple[float, float, float, float] | None:
    """Threshold-free box from the gamma-weighted moments: (x_c +/- n sigma_x, y_c +/- n sigma_y).

    Clipped to the map and at least ``min_side`` pixels on each side.
    """
    w = _weights(amap, gamma)
    if w is None:
        return None
    h, wd = w.shape
    rows, cols = np.indices(w.shape)
    xc, yc = (w * cols).sum(), (w * rows).sum()
    sx = np.sqrt(max((w * (cols - xc) ** 2).sum(), 0.0))
    sy = np.sqrt(max((w * (rows - yc) ** 2).sum(), 0.0))
    hx, hy = max(n_sigma * sx, min_side / 2), max(n_sigma * sy, min_side / 2)
    x0, x1 = max(0.0, xc - hx), min(wd - 1.0, xc + hx)
    y0, y1 = max(0.0, yc - hy), min(h - 1.0, yc + hy)
    return float(x0), float(y0), float(x1), float(y1)


def max_point(amap: np.ndarray) -> tuple[float, float] | None:
    """The pixel of maximum anomaly (paper ablation)."""
    m = np.asarray(amap, dtype=np.float64)
    if not np.isfinite(m).all() or m.max() <= 0:
        return None
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    return float(c), float(r)


def threshold_boxes(amap: np.ndarray, threshold: float = 0.5) -> list[tuple[float, float, float, float]]:
    """Bounding boxes of the connected components of ``amap > threshold`` (paper ablation)."""
    m = np.asarray(amap)
    if not np.isfinite(m).all():
        return []
    lab, n = ndimage.label(m > threshold)
    boxes = []
    for sl in ndimage.find_objects(lab):
        if sl is None:
            continue
        r, c = sl
        boxes.append((float(c.start), float(r.start), float(c.stop - 1), float(r.stop - 1)))
    return boxes


def make_prompt(amap: np.ndarray, kind: str, *, gamma: float = 5.0, threshold: float = 0.5) -> Prompt | None:
    """The prompt of type ``kind`` for one map, or ``None`` when the map gives none."""
    if kind == "cog-point":
        p = centre_of_gravity(amap, gamma)
        return None if p is None else Prompt("point", point=p)
    if kind == "cog-box":
        b = cog_box(amap, gamma)
        return None if b is None else Prompt("box", box=b)
    if kind == "max-point":
        p = max_point(amap)
        return None if p is None else Prompt("point", point=p)
    if kind == "threshold-box":
        boxes = threshold_boxes(amap, threshold)
        if not boxes:
            return None
        return Prompt("box", box=boxes[0]) if len(boxes) == 1 else Prompt("boxes", boxes=tuple(boxes))
    raise ValueError(f"unknown prompt type {kind!r}")
