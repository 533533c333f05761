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
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from .prompts import Prompt, cog_weights
from ..core.defaults import GAMMA, SIGMA

__all__ = ["NormalLevels", "normal_levels", "bank_levels", "anomalous_regions", "SliceRegion", "slice_regions",
           "region_piece", "region_cores", "regions_prompt", "decode_regions", "SEED_QUANTILE", "EXTENT_QUANTILE", "CORE_PAD",
           "MIN_NORMAL_PEAKS", "normal_peak_count", "regions_supported"]

#: Where a region starts: this percentile of held-out normal slices' calibrated peaks.
SEED_QUANTILE = 97.0
#: Where a region ends: this (lower) percentile of the same peaks.
EXTENT_QUANTILE = 95.0
#: A box prompt reaches this far (frame pixels) beyond its region's core: how far the map spreads
#: one hot spot, the 5x5 patch's half-width (2 embedding cells of 256 / 64 = 4 frame pixels) plus
#: the map's Gaussian smoothing (sigma 4 frame pixels).
CORE_PAD = 2 * 4.0 + SIGMA
#: The fewest held-out normal peaks whose 97th percentile is not simply their maximum (1 / 3 %):
#: with fewer, the volumes' default falls back to the backbone's per-slice prompt.
MIN_NORMAL_PEAKS = math.ceil(100.0 / (100.0 - SEED_QUANTILE))

Box = tuple[float, float, float, float]

#: Local maxima of each held-out normal map that the bank's calibration keeps (the highest ones).
LOCAL_PEAKS_PER_SLICE = 16
#: A local maximum is the highest value within this window (frame px): two patch strides (2 x 8 px)
#: plus one, so one hot patch gives one maximum, not a ripple of them.
PEAK_WINDOW = 17
#: Exceedances per held-out slice that the tail fit of :func:`tail_level` uses.
TAIL_PER_SLICE = 2.0


def local_peaks(maps: np.ndarray, *, top: int = LOCAL_PEAKS_PER_SLICE, window: int = PEAK_WINDOW) -> list[list[float]]:
    """The ``top`` highest local maxima (values) of each (H, W) map of ``maps``, highest first.

    A local maximum is a pixel equal to the maximum of its ``window`` x ``window`` neighbourhood
    and above the map's median (flat background is not a maximum)."""
    out = []
    for m in np.asarray(maps, dtype=np.float32):
        mx = ndimage.maximum_filter(m, size=window, mode="nearest")
        vals = m[(m == mx) & (m > np.median(m))]
        out.append([float(v) for v in np.sort(vals)[::-1][:top]])
    return out


def tail_level(peaks: list[list[float]], rate: float, *, per_slice: float = TAIL_PER_SLICE) -> float:
    """The level that normal slices' local maxima exceed ``rate`` times per slice on average,
    from a peaks-over-threshold fit: the highest ``per_slice`` x S maxima of the S held-out
    slices (``peaks``: each slice's local maxima) above the next one, ``u``, fitted with an
    exponential tail (mean excess ``beta``), so that the rate above ``t`` is
    ``(n_u / S) exp(-(t - u) / beta)``. Exceedances are Poisson, so a slice reaches the level
    with probability ``1 - exp(-rate)``. Uses every local maximum near the top, not one peak per
    slice, and extrapolates beyond the largest one when S is small."""
    n_slices = len(peaks)
    values = np.sort(np.concatenate([np.asarray(p, np.float64) for p in peaks] or [np.empty(0)]))[::-1]
    if n_slices == 0 or values.size < 2:
        raise ValueError("too few held-out normal maxima for a tail fit")
    n_u = int(min(values.size - 1, max(2, round(per_slice * n_slices))))
    u = float(values[n_u])
    beta = float(np.mean(values[:n_u] - u))
    lam_u = n_u / n_slices
    if beta <= 0 or rate >= lam_u:
        return float(np.quantile(values, 1.0 - min(rate, 1.0) * n_slices / values.size))
    return u + beta * math.log(lam_u / rate)


@dataclass(frozen=True)
class NormalLevels:
    """Calibrated map levels taken from held-out normal maps (see the module docstring); ``method``
    says how: ``"tail"`` (:func:`tail_level` on their local maxima) or ``"quantile"`` (percentiles
    of one peak per held-out slice, the previous rule)."""

    seed: float
    extent: float
    extent_quantile: float
    method: str = "quantile"

    def as_dict(self) -> dict:
        return {"seed": self.seed, "extent": self.extent, "extent_quantile": self.extent_quantile, "method": self.method}


def _rate(quantile: float) -> float:
    """Poisson rate of exceedances per slice at which a share ``1 - quantile / 100`` of slices
    reaches a level."""
    return -math.log(min(max(quantile / 100.0, 1e-9), 1.0 - 1e-9))


def normal_levels(calibration_entry: dict, *, extent_quantile: float = EXTENT_QUANTILE,
                  seed_quantile: float = SEED_QUANTILE, method: str | None = None) -> NormalLevels:
    """Levels from one ``bank.manifest['calibration']['per_k'][k]`` entry, in calibrated units.

    ``seed``: the level that a share ``1 - seed_quantile / 100`` of normal slices reaches;
    ``extent`` the same for ``extent_quantile`` (never above ``seed``). ``method`` ``"tail"``
    (the default where the bank records its held-out maps' local maxima): from
    :func:`tail_level`, which uses every high local maximum of every held-out normal map and holds
    with a few held-out slices; ``"quantile"`` (banks made before): the percentiles of the
    held-out slices' peaks, one per slice; with few slices those are about their maximum.
    """
    peaks = np.asarray(calibration_entry.get("slice_max_map") or [], dtype=np.float64)
    if peaks.size == 0:
        raise ValueError("the bank holds no held-out normal slice peaks (calibration); regions need them. "
                         "Rebuild the bank with normal slices from at least one source.")
    local = calibration_entry.get("local_peaks") or []
    method = method or ("tail" if local else "quantile")
    low, high = float(calibration_entry["low"]), float(calibration_entry["high"])
    span = max(high - low, 1e-12)
    if method == "tail":
        if not local:
            local = [[float(v)] for v in peaks]  # one maximum per slice: the tail fit still extrapolates
        seed = max(0.0, (tail_level(local, _rate(seed_quantile)) - low) / span)
        extent = max(0.0, (tail_level(local, _rate(extent_quantile)) - low) / span)
    elif method == "quantile":
        cal = np.clip((peaks - low) / span, 0.0, None)
        seed = float(np.percentile(cal, seed_quantile))
        extent = float(np.percentile(cal, extent_quantile))
    else:
        raise ValueError(f"unknown level method {method!r}: 'tail' or 'quantile'")
    return NormalLevels(seed=float(seed), extent=float(min(extent, seed)), extent_quantile=float(extent_quantile), method=method)


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


def _box_of(sl: tuple[slice, slice]) -> Box:
    """A ``find_objects`` slice as an inclusive (x0, y0, x1, y1) box."""
    r, c = sl
    return (float(c.start), float(r.start), float(c.stop - 1), float(r.stop - 1))


def bank_levels(bank, k: int = 1, **kwargs) -> NormalLevels:
    """:func:`normal_levels` from a bank's calibration for ``k`` (the nearest stored k)."""
    per_k = (bank.manifest.get("calibration") or {}).get("per_k", {})
    if not per_k:
        raise ValueError(f"{getattr(bank, 'path', None) or 'bank'}: holds no calibration statistics; region prompts "
                         "need the held-out normal slices' peaks (rebuild the bank from normal slices).")
    key = str(k) if str(k) in per_k else str(max([int(x) for x in per_k if int(x) <= max(k, 1)] or [min(int(x) for x in per_k)]))
    return normal_levels(per_k[key], **kwargs)


def normal_peak_count(bank, k: int = 1) -> int:
    """How many held-out normal slices' peaks the bank's calibration holds (for ``k``, else k = 1)."""
    per_k = (bank.manifest.get("calibration") or {}).get("per_k", {})
    entry = per_k.get(str(k)) or per_k.get("1") or {}
    return len(entry.get("slice_max_map") or [])


def regions_supported(bank, k: int = 1) -> bool:
    """Whether the bank's calibration holds enough normal peaks (:data:`MIN_NORMAL_PEAKS`) for the
    regions prompt to be the volumes' default."""
    return normal_peak_count(bank, k) >= MIN_NORMAL_PEAKS


# -- MIAS-SAM inside each region piece ----------------------------------------------------------
#: A box prompt (LiteMedSAM) reaches this many gamma-weighted standard deviations of the map inside
#: its piece each side of the piece's centre of gravity ...
BOX_SIGMAS = 2.0
#: ... plus this margin (frame px), and at least :data:`BOX_MIN_HALF` px.
BOX_PAD = 8.0
BOX_MIN_HALF = 4.0
#: A decoder mask agrees with its region when the Dice of the mask (inside the piece) with the
#: piece is at least this (label-free: the piece is where the calibrated map is anomalous).
AGREEMENT_MIN = 0.3
#: The outcome code of a piece whose masks all disagree with the map: the piece itself is the mask.
REGION_OUTCOME = 0


@dataclass(frozen=True)
class RegionPrompt:
    """One region piece on one slice and the prompt made from it: ``centre`` is the gamma-weighted
    centre of gravity of the map inside the piece (x, y), ``prompt`` the point at it (SAM) or the box
    of the weighted moments centred on it (LiteMedSAM); ``extent_box`` is the piece's own bounding
    box, ``peak`` and ``area`` its maximum and size."""

    label: int
    centre: tuple[float, float]
    prompt: Prompt
    peak: float
    area: int
    extent_box: Box
    piece: np.ndarray = field(repr=False, compare=False, default=None)  # type: ignore[assignment]  # (H, W) bool


def piece_moments(map_2d: np.ndarray, piece: np.ndarray, gamma: float) -> tuple[float, float, float, float] | None:
    """(x_c, y_c, sigma_x, sigma_y) of the weights I^gamma of the map inside ``piece`` (Eq. 2 of the
    paper restricted to the piece); None when the map is zero there."""
    w = cog_weights(np.where(piece, map_2d, 0.0), gamma)
    if w is None:
        return None
    rows, cols = np.indices(w.shape)
    xc, yc = float((w * cols).sum()), float((w * rows).sum())
    sx = math.sqrt(max(float((w * (cols - xc) ** 2).sum()), 0.0))
    sy = math.sqrt(max(float((w * (rows - yc) ** 2).sum()), 0.0))
    return xc, yc, sx, sy


def moment_box(xc: float, yc: float, sx: float, sy: float, shape: tuple[int, int], *, n_sigma: float = BOX_SIGMAS,
               pad: float = BOX_PAD, min_half: float = BOX_MIN_HALF) -> Box:
    """(x_c +/- (n sigma_x + pad), y_c +/- (n sigma_y + pad)), each half at least ``min_half`` and
    shrunk symmetrically to stay inside the frame: the box's centre is the centre of gravity."""
    h, w = shape
    hx = min(max(n_sigma * sx, min_half) + pad, xc, w - 1.0 - xc)
    hy = min(max(n_sigma * sy, min_half) + pad, yc, h - 1.0 - yc)
    return (xc - hx, yc - hy, xc + hx, yc + hy)


def region_prompts(labels_2d: np.ndarray, map_2d: np.ndarray, *, gamma: float = GAMMA, kind: str = "box",
                   n_sigma: float = BOX_SIGMAS, pad: float = BOX_PAD) -> list[RegionPrompt]:
    """One prompt per region piece present on this slice (each 2D piece of a label), most anomalous
    first: ``kind`` ``"point"`` (the piece's gamma-weighted centre of gravity) or ``"box"``
    (:func:`moment_box` around it)."""
    if kind not in ("point", "box"):
        raise ValueError(f"region prompts are points or boxes, got {kind!r}")
    out: list[RegionPrompt] = []
    shape = labels_2d.shape
    for lab, piece, sl in region_pieces(labels_2d):
        mo = piece_moments(map_2d, piece, gamma)
        if mo is None:
            continue
        xc, yc, sx, sy = mo
        prompt = (Prompt("point", point=(xc, yc)) if kind == "point"
                  else Prompt("box", box=moment_box(xc, yc, sx, sy, shape, n_sigma=n_sigma, pad=pad)))
        out.append(RegionPrompt(lab, (xc, yc), prompt, float(map_2d[piece].max()), int(piece.sum()), _box_of(sl), piece))
    out.sort(key=lambda r: -r.peak)
    return out


def mask_agreement(mask: np.ndarray, piece: np.ndarray) -> float:
    """How well a decoder mask agrees with its region: the Dice of the mask's part inside the
    piece with the piece (0 for an empty mask)."""
    inside = mask & piece
    total = int(inside.sum()) + int(piece.sum())
    return 2.0 * int(inside.sum()) / total if total else 0.0


def choose_mask(masks: np.ndarray, piece: np.ndarray, preferred: int, *, minimum: float = AGREEMENT_MIN
                ) -> tuple[np.ndarray, int, float]:
    """The mask a piece keeps when ``preferred`` (1-3) is asked for: that decoder mask if it agrees
    with the region (:func:`mask_agreement` >= ``minimum``), else the best-agreeing of the three if
    one does, else the piece itself. Masks are clipped to the piece. Returns (mask, outcome: the
    mask used, 1-3, or :data:`REGION_OUTCOME`, its agreement)."""
    ag = [mask_agreement(masks[i], piece) for i in range(3)]
    pick = preferred - 1
    if ag[pick] < minimum:
        best = int(np.argmax(ag))
        if ag[best] < minimum:
            return piece.copy(), REGION_OUTCOME, 1.0
        pick = best
    return masks[pick] & piece, pick + 1, float(ag[pick])


def region_pieces(labels_2d: np.ndarray) -> list[tuple[int, np.ndarray, tuple[slice, slice]]]:
    """Each 2D piece of each region label on one slice: (label, bool mask (frame), bounding slices)."""
    out = []
    for lab in np.unique(labels_2d):
        if lab == 0:
            continue
        pieces, _ = ndimage.label(labels_2d == lab)
        for i, sl in enumerate(ndimage.find_objects(pieces), start=1):
            if sl is not None:
                piece = np.zeros(labels_2d.shape, bool)
                piece[sl] = pieces[sl] == i
                out.append((int(lab), piece, sl))
    return out


@dataclass
class RegionDecode:
    """One slice decoded with one prompt per region piece (:func:`decode_regions`).

    ``logits`` (3, H, W) float16: slot ``i`` unites, over the pieces, the mask each piece keeps when
    mask ``i + 1`` is asked for (:func:`choose_mask`; logits +1 inside the piece where the piece
    itself is kept, capped at -1 outside the piece). ``ious``: the decoder's predicted IoUs, the best
    piece's per slot. ``regions``: the prompts, most anomalous first. ``outcomes`` (3, P) int8 and
    ``agreement`` (3, P): per slot and piece, the mask kept (1-3, or :data:`REGION_OUTCOME`) and
    its agreement with the region."""

    logits: np.ndarray
    ious: np.ndarray
    regions: list[RegionPrompt]
    outcomes: np.ndarray
    agreement: np.ndarray

    @property
    def prompt(self) -> Prompt | None:
        return regions_prompt(self.regions)


def regions_prompt(regions: list[RegionPrompt]) -> Prompt | None:
    """The slice's prompt as recorded in results: one point or box, several, or none."""
    if not regions:
        return None
    if len(regions) == 1:
        return regions[0].prompt
    if regions[0].prompt.kind == "point":
        return Prompt("points", points=tuple(r.prompt.point for r in regions))  # type: ignore[misc]
    return Prompt("boxes", boxes=tuple(r.prompt.box for r in regions))  # type: ignore[misc]


def decode_regions(backbone, embedding, labels_2d: np.ndarray, map_2d: np.ndarray, *, gamma: float = GAMMA,
                   kind: str = "box", moved: dict[int, Prompt] | None = None) -> RegionDecode:
    """Decode one slice with one prompt per region piece (:func:`region_prompts`) and unite the
    masks each piece keeps (:func:`choose_mask`, for each of the three mask choices).

    ``moved``: piece index -> a prompt the user placed instead (its masks are kept as the decoder
    gives them: no clipping to the piece and no agreement rule; outcome = the mask asked for)."""
    regions = region_prompts(labels_2d, map_2d, gamma=gamma, kind=kind)
    shape = labels_2d.shape
    n = len(regions)
    if not regions:
        return RegionDecode(np.zeros((3, *shape), np.float16), np.full(3, np.nan, np.float32), [],
                            np.zeros((3, 0), np.int8), np.zeros((3, 0), np.float32))
    logits = np.full((3, *shape), -np.inf, np.float32)
    ious = np.full(3, -np.inf, np.float32)
    outcomes = np.zeros((3, n), np.int8)
    agreement = np.zeros((3, n), np.float32)
    emb = embedding.float() if hasattr(embedding, "float") else embedding
    for j, reg in enumerate(regions):
        piece = reg.piece
        user = (moved or {}).get(j)
        if user is not None:
            regions[j] = replace(reg, centre=_centre(user), prompt=user)
        out = backbone.decode(emb, regions[j].prompt)
        lg = np.asarray(out.logits, np.float32)
        ious = np.maximum(ious, np.asarray(out.iou, np.float32))
        masks = lg > 0
        for slot in range(3):
            if user is not None:
                kept, outcome, ag = lg[slot], slot + 1, mask_agreement(masks[slot], piece)
            else:
                m, outcome, ag = choose_mask(masks, piece, slot + 1)
                kept = (np.where(piece, 1.0, -1.0) if outcome == REGION_OUTCOME
                        else np.where(piece, lg[outcome - 1], np.minimum(lg[outcome - 1], -1.0)))
            logits[slot] = np.maximum(logits[slot], kept)
            outcomes[slot, j], agreement[slot, j] = outcome, ag
    return RegionDecode(logits.astype(np.float16), ious, regions, outcomes, agreement)


def _centre(p: Prompt) -> tuple[float, float]:
    if p.kind == "point":
        return (float(p.point[0]), float(p.point[1]))  # type: ignore[index]
    x0, y0, x1, y1 = p.box  # type: ignore[misc]
    return ((x0 + x1) / 2, (y0 + y1) / 2)
