"""Anomalous regions of a volume's calibrated anomaly maps, with levels from normal data only.

A calibrated map is 0 on typical normal tissue and 1 at the 99th percentile of held-out normal
slices' peaks (:class:`~napari_mias_sam.method.anomaly.Calibration`). The bank also records every
held-out normal slice's peak, so two levels need no test data and no user setting:

- ``seed``: a high quantile of held-out normal slices' peaks (the 97th percentile: about one
  normal slice in 30 reaches it). A region exists only where the map goes above it.
- ``extent``: a lower quantile of the same peaks (the 95th percentile): where a region ends.

Both quantiles were chosen on the development split (docs/results.md, every variant tried). A
bank whose calibration holds fewer than :data:`MIN_NORMAL_PEAKS` held-out slices cannot tell its
97th percentile from its maximum; volumes segmented with it default to the per-slice prompt.

Regions are hysteresis components: connected components of ``map > extent`` that contain a
seed pixel. In 3D (the default for volumes) a component found on one slice carries to its
neighbours for as long as the map stays above ``extent``, so a lesion is one object and slices
where the map is back at normal levels get no region at all.

Each region piece on a slice is one box prompt: the bounding box of its core (the pixels above
``seed``) widened by how far the map spreads a hot spot (:data:`CORE_PAD`: the 5x5 patch's
half-width plus the smoothing sigma), or the piece's own box where the core does not reach this
slice. The decoder's masks are clipped to the piece they were prompted from, and the pieces'
masks are united (the regions prompt uses the decoder's first mask, ``defaults.REGIONS_MASK``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core import defaults
from .anomaly import calibration_entry
from .patches import GRID, PATCH
from .preprocess import FRAME
from .prompts import Prompt

__all__ = ["NormalLevels", "normal_levels", "bank_levels", "anomalous_regions", "SliceRegion", "slice_regions",
           "region_piece", "region_cores", "regions_prompt", "decode_regions", "SEED_QUANTILE", "EXTENT_QUANTILE", "CORE_PAD",
           "MIN_NORMAL_PEAKS", "normal_peak_count", "regions_supported"]

#: Where a region starts: this percentile of held-out normal slices' calibrated peaks.
SEED_QUANTILE = 97.0
#: Where a region ends: this (lower) percentile of the same peaks.
EXTENT_QUANTILE = 95.0
#: A box prompt reaches this far (frame pixels) beyond its region's core: how far the map spreads
#: one hot spot, the 5x5 patch's half-width (2 embedding cells of 256 / 64 = 4 frame pixels; the
#: 32 x 32 patch grid has stride 2 over the 64 x 64 embedding) plus the map's Gaussian smoothing
#: (``defaults.SIGMA``, 4 frame pixels): 12 frame pixels.
CORE_PAD = (PATCH // 2) * FRAME / (2 * GRID) + defaults.SIGMA
#: The fewest held-out normal peaks whose 97th percentile is not simply their maximum (1 / 3 %):
#: with fewer, the volumes' default falls back to the backbone's per-slice prompt.
MIN_NORMAL_PEAKS = math.ceil(100.0 / (100.0 - SEED_QUANTILE))

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class NormalLevels:
    """Calibrated map levels taken from held-out normal slices' peaks (see the module docstring)."""

    seed: float
    extent: float
    extent_quantile: float

    def as_dict(self) -> dict:
        return {"seed": self.seed, "extent": self.extent, "extent_quantile": self.extent_quantile}


def normal_levels(calibration_entry: dict, *, extent_quantile: float = EXTENT_QUANTILE,
                  seed_quantile: float = SEED_QUANTILE) -> NormalLevels:
    """Levels from one ``bank.manifest['calibration']['per_k'][k]`` entry.

    ``seed`` = the ``seed_quantile`` percentile over held-out normal slices of their calibrated
    peak; ``extent`` = the ``extent_quantile`` percentile of the same peaks (never above ``seed``).
    """
    peaks = np.asarray(calibration_entry.get("slice_max_map") or [], dtype=np.float64)
    if peaks.size == 0:
        raise ValueError("the bank holds no held-out normal slice peaks (calibration); regions need them. "
                         "Rebuild the bank with normal slices from at least one source.")
    low, high = float(calibration_entry["low"]), float(calibration_entry["high"])
    cal = np.clip((peaks - low) / max(high - low, 1e-12), 0.0, None)
    seed = float(np.percentile(cal, seed_quantile))
    extent = min(float(np.percentile(cal, extent_quantile)), seed)
    return NormalLevels(seed=seed, extent=extent, extent_quantile=float(extent_quantile))


def anomalous_regions(maps: np.ndarray, levels: NormalLevels, *, foreground: np.ndarray | None = None,
                      three_d: bool = True) -> np.ndarray:
    """(N, H, W) int32 labels of the hysteresis regions of calibrated ``maps`` (0 = none).

    ``three_d``: components connect across neighbouring slices (one label per 3D object);
    otherwise each slice is labelled on its own (labels stay unique over the stack).
    """
    m = np.asarray(maps, dtype=np.float32)
    if m.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {m.shape}")
    low = m > levels.extent
    if foreground is not None:
        low &= np.asarray(foreground, bool)[:, None, None]
    high = low & (m > levels.seed)
    if not high.any():
        return np.zeros(m.shape, np.int32)
    if three_d:
        lab, n = ndimage.label(low)
        keep = np.zeros(n + 1, bool)
        keep[np.unique(lab[high])] = True
        keep[0] = False
        out = np.where(keep[lab], lab, 0)
    else:
        out = np.zeros(m.shape, np.int32)
        nxt = 0
        for s in np.flatnonzero(high.reshape(len(m), -1).any(1)):
            lab, n = ndimage.label(low[s])
            keep = np.zeros(n + 1, bool)
            keep[np.unique(lab[high[s]])] = True
            keep[0] = False
            out[s] = np.where(keep[lab], lab + nxt, 0)
            nxt += n
    # relabel 1..n in order of appearance
    ids = np.unique(out)
    ids = ids[ids > 0]
    lut = np.zeros(int(out.max()) + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[out]


@dataclass(frozen=True)
class SliceRegion:
    """One region's part on one slice: its label, its box prompt (x0, y0, x1, y1), the piece's
    own bounding box ``extent_box``, its peak and area (frame pixels)."""

    label: int
    box: Box
    peak: float
    area: int
    extent_box: Box


def _padded(box: Box, pad: float, shape: tuple[int, int]) -> Box:
    h, w = shape
    return (max(0.0, box[0] - pad), max(0.0, box[1] - pad), min(w - 1.0, box[2] + pad), min(h - 1.0, box[3] + pad))


def _box_of(sl: tuple[slice, slice]) -> Box:
    """A ``find_objects`` slice as an inclusive (x0, y0, x1, y1) box."""
    r, c = sl
    return (float(c.start), float(r.start), float(c.stop - 1), float(r.stop - 1))


def region_cores(maps: np.ndarray, labels: np.ndarray, levels: NormalLevels) -> np.ndarray:
    """(N, H, W) bool: the regions' pixels where calibrated ``maps`` exceed the seed level."""
    return (np.asarray(labels) > 0) & (np.asarray(maps) > levels.seed)


def slice_regions(labels_2d: np.ndarray, map_2d: np.ndarray, *, core: np.ndarray | None = None,
                  pad: float = CORE_PAD) -> list[SliceRegion]:
    """The regions present on one slice (each 2D piece of a label is one prompt), largest peak first.

    ``core``: the slice's :func:`region_cores`; a piece's box prompt is the bounding box of its
    core pixels widened by ``pad``. Without ``core``, or where the piece holds no core pixel, the
    piece's own bounding box is the prompt.
    """
    out: list[SliceRegion] = []
    shape = labels_2d.shape
    for lab in np.unique(labels_2d):
        if lab == 0:
            continue
        pieces, _ = ndimage.label(labels_2d == lab)
        for i, sl in enumerate(ndimage.find_objects(pieces), start=1):
            if sl is None:
                continue
            piece = pieces[sl] == i  # within the piece's own bounding box
            extent_box = _box_of(sl)
            inner = piece & core[sl] if core is not None else None
            box = extent_box
            if inner is not None and inner.any():
                x0, y0 = sl[1].start, sl[0].start
                ib = _box_of(ndimage.find_objects(inner.astype(np.int8))[0])
                box = _padded((ib[0] + x0, ib[1] + y0, ib[2] + x0, ib[3] + y0), pad, shape)
            out.append(SliceRegion(int(lab), box, float(map_2d[sl][piece].max()), int(piece.sum()), extent_box))
    out.sort(key=lambda r: -r.peak)
    return out


def bank_levels(bank, k: int = defaults.K, **kwargs) -> NormalLevels:
    """:func:`normal_levels` from a bank's calibration entry for ``k`` (:func:`~.anomaly.calibration_entry`)."""
    entry = calibration_entry(bank.manifest.get("calibration"), k)
    if entry is None:
        raise ValueError(f"{getattr(bank, 'path', None) or 'bank'}: holds no calibration statistics; region prompts "
                         "need the held-out normal slices' peaks (rebuild the bank from normal slices).")
    return normal_levels(entry, **kwargs)


def normal_peak_count(bank, k: int = defaults.K) -> int:
    """How many held-out normal slices' peaks the bank's calibration entry for ``k`` holds."""
    entry = calibration_entry(bank.manifest.get("calibration"), k) or {}
    return len(entry.get("slice_max_map") or [])


def regions_supported(bank, k: int = defaults.K) -> bool:
    """Whether the bank's calibration holds enough normal peaks (:data:`MIN_NORMAL_PEAKS`) for the
    regions prompt to be the volumes' default."""
    return normal_peak_count(bank, k) >= MIN_NORMAL_PEAKS


def region_piece(labels_2d: np.ndarray, region: SliceRegion) -> np.ndarray:
    """The region's pixels inside its own bounding box on this slice (bool, frame)."""
    piece = np.zeros(labels_2d.shape, bool)
    x0, y0, x1, y1 = (int(round(v)) for v in region.extent_box)
    piece[y0:y1 + 1, x0:x1 + 1] = labels_2d[y0:y1 + 1, x0:x1 + 1] == region.label
    return piece


def regions_prompt(regions: list[SliceRegion]) -> Prompt | None:
    """The slice's prompt as recorded in results: one box, several boxes, or none."""
    if not regions:
        return None
    if len(regions) == 1:
        return Prompt("box", box=regions[0].box)
    return Prompt("boxes", boxes=tuple(r.box for r in regions))


def decode_regions(backbone, embedding, labels_2d: np.ndarray, map_2d: np.ndarray, *,
                   core: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Prompt | None]:
    """Decode one slice with one box per region piece (:func:`slice_regions`) and unite the masks.

    Returns (logits (3, 256, 256) float16, predicted IoUs (3,), the prompt). Slot ``i`` of the
    logits is the union, over regions, of decoder mask ``i + 1`` clipped to the piece it was
    prompted from (outside the piece its logits are capped at -1, so it is never foreground).
    IoUs: the best region's per slot.
    """
    regions = slice_regions(labels_2d, map_2d, core=core)
    shape = (3, *labels_2d.shape)
    if not regions:
        return np.zeros(shape, np.float16), np.full(3, np.nan, np.float32), None
    logits = np.full(shape, -np.inf, np.float32)
    ious = np.full(3, -np.inf, np.float32)
    emb = embedding.float() if hasattr(embedding, "float") else embedding
    for reg in regions:
        out = backbone.decode(emb, Prompt("box", box=reg.box))
        lg = np.asarray(out.logits, np.float32)
        ious = np.maximum(ious, np.asarray(out.iou, np.float32))
        logits = np.maximum(logits, np.where(region_piece(labels_2d, reg)[None], lg, np.minimum(lg, -1.0)))
    return logits.astype(np.float16), ious, regions_prompt(regions)
