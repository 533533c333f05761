"""Anomalous regions of a volume's calibrated anomaly maps, with levels from normal data only.

A calibrated map is 0 on typical normal tissue and 1 at the 99th percentile of held-out normal
slices' peaks (:class:`~napari_mias_sam.method.anomaly.Calibration`). The bank also records every
held-out normal slice's peak and its highest local maxima, so two levels need no test data and no
user setting:

- ``seed``: the level that about one normal slice in 30 reaches (``SEED_QUANTILE`` 97). A region
  exists only where the map goes above it.
- ``extent``: a lower level (``EXTENT_QUANTILE`` 95): where a region ends.

How the levels are estimated depends on the bank's size (``method="auto"``): with at least
:data:`MIN_NORMAL_PEAKS` held-out slices, the percentiles of their peaks (one per slice; the rule
chosen on the development split, unchanged since issue 12); with fewer (a bank from one or two
subjects, whose 97th percentile of peaks is simply their maximum), the seed and extent are the
:data:`PIXEL_SEED_QUANTILE` / :data:`PIXEL_EXTENT_QUANTILE` percentiles of *every pixel* of the
held-out normal maps (``map_quantiles``, recorded at build time): far more normal evidence than
one peak per slice, and it does not extrapolate from a handful of slices (chosen on the
development split with one-subject banks, docs/results.md). So the regions prompt is the volumes'
default with a bank of any size (:func:`regions_supported`). Small banks built before the pixel
percentiles were recorded keep the per-slice default; asked for regions, they use a
peaks-over-threshold fit (:func:`tail_level`) on the held-out maps' local maxima (extent at
:data:`TAIL_EXTENT_QUANTILE`).

Regions are hysteresis components: connected components of ``map > extent`` that contain a
seed pixel. In 3D (the default for volumes) a component found on one slice carries to its
neighbours for as long as the map stays above ``extent``, so a lesion is one object and slices
where the map is back at normal levels get no region at all. Each 2D piece of a region is one
prompt, made inside the piece from the gamma-weighted map (:mod:`.region_prompts`).
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

__all__ = ["NormalLevels", "normal_levels", "bank_levels", "anomalous_regions", "region_cores", "local_peaks",
           "tail_level", "SEED_QUANTILE", "EXTENT_QUANTILE", "TAIL_EXTENT_QUANTILE", "CORE_PAD", "MIN_NORMAL_PEAKS",
           "normal_peak_count", "regions_supported", "no_regions_reason", "MAP_QUANTILES", "PIXEL_SEED_QUANTILE", "PIXEL_EXTENT_QUANTILE"]

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
#: with fewer, the levels are pixel percentiles of the held-out maps (:data:`PIXEL_SEED_QUANTILE`).
MIN_NORMAL_PEAKS = math.ceil(100.0 / (100.0 - SEED_QUANTILE))
#: The extent level's quantile with the tail fit (chosen on the development split: 95 left the
#: regions too tight there, 85 matched the percentile rule).
TAIL_EXTENT_QUANTILE = 85.0

#: Small banks (fewer than :data:`MIN_NORMAL_PEAKS` held-out slices): the seed and extent levels
#: are these percentiles of every pixel of the held-out normal maps (``map_quantiles``).
PIXEL_SEED_QUANTILE = 99.9
PIXEL_EXTENT_QUANTILE = 99.0

#: Local maxima of each held-out normal map that the bank's calibration keeps (the highest ones).
LOCAL_PEAKS_PER_SLICE = 16
#: A local maximum is the highest value within this window (frame px): two patch strides (2 x 8 px)
#: plus one, so one hot patch gives one maximum, not a ripple of them.
PEAK_WINDOW = 17
#: Percentiles of every pixel of the held-out normal maps that the bank's calibration keeps
#: (``calibration.per_k[k].map_quantiles``; keys are the percentiles as strings).
MAP_QUANTILES = ("50", "90", "95", "98", "99", "99.5", "99.8", "99.9", "99.95", "99.99", "100")
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
    seed_quantile: float = SEED_QUANTILE

    def as_dict(self) -> dict:
        return {"seed": self.seed, "extent": self.extent, "extent_quantile": self.extent_quantile, "method": self.method,
                "seed_quantile": self.seed_quantile}

    def describe(self) -> str:
        """One line: how the levels were placed and their values (``<stem>_points.csv``, the dock)."""
        how = {"quantile": "held-out slices' peaks", "pixel": "held-out maps' pixels", "tail": "tail fit of held-out maxima"}
        return (f"{self.method}: q{self.seed_quantile:g}/q{self.extent_quantile:g} of {how.get(self.method, self.method)}, "
                f"seed {self.seed:.3f}, extent {self.extent:.3f}")


def _rate(quantile: float) -> float:
    """Poisson rate of exceedances per slice at which a share ``1 - quantile / 100`` of slices
    reaches a level."""
    return -math.log(min(max(quantile / 100.0, 1e-9), 1.0 - 1e-9))


def _map_quantile(quantiles: dict, q: float) -> float:
    """The recorded pixel percentile ``q`` of the held-out normal maps (linear between the
    recorded ones)."""
    if not quantiles:
        raise ValueError("the bank's calibration holds no pixel percentiles of its held-out normal maps "
                         "(banks built before they were recorded); rebuild the bank.")
    xs = sorted((float(k), float(v)) for k, v in quantiles.items())
    return float(np.interp(q, [x for x, _ in xs], [v for _, v in xs]))


def normal_levels(calibration_entry: dict, *, extent_quantile: float | None = None,
                  seed_quantile: float = SEED_QUANTILE, method: str = "auto") -> NormalLevels:
    """Levels from one ``bank.manifest['calibration']['per_k'][k]`` entry, in calibrated units.

    ``seed``: the level that a share ``1 - seed_quantile / 100`` of normal slices reaches;
    ``extent`` the same for ``extent_quantile`` (never above ``seed``). ``method``:
    ``"quantile"``: the percentiles of the held-out slices' peaks, one per slice (extent default
    :data:`EXTENT_QUANTILE`); ``"tail"``: :func:`tail_level` on every high local maximum of every
    held-out map (one peak per slice for banks made before they were recorded), which holds with a
    few held-out slices (extent default :data:`TAIL_EXTENT_QUANTILE`); ``"pixel"``: the percentiles
    of every pixel of the held-out maps (``map_quantiles``; seed :data:`PIXEL_SEED_QUANTILE` when
    ``seed_quantile`` is left at its default, extent :data:`PIXEL_EXTENT_QUANTILE`); ``"auto"``:
    quantile with at least :data:`MIN_NORMAL_PEAKS` held-out slices, else pixel (tail for banks
    made before pixel percentiles were recorded).
    """
    peaks = np.asarray(calibration_entry.get("slice_max_map") or [], dtype=np.float64)
    if peaks.size == 0:
        raise ValueError("the bank holds no held-out normal slice peaks (calibration); regions need them. "
                         "Rebuild the bank with normal slices from at least one source.")
    if method == "auto":
        method = "quantile" if peaks.size >= MIN_NORMAL_PEAKS else ("pixel" if calibration_entry.get("map_quantiles") else "tail")
    if method == "pixel" and seed_quantile == SEED_QUANTILE:
        seed_quantile = PIXEL_SEED_QUANTILE
    if extent_quantile is None:
        extent_quantile = {"tail": TAIL_EXTENT_QUANTILE, "pixel": PIXEL_EXTENT_QUANTILE}.get(method, EXTENT_QUANTILE)
    low, high = float(calibration_entry["low"]), float(calibration_entry["high"])
    span = max(high - low, 1e-12)
    if method == "pixel":
        qs = calibration_entry.get("map_quantiles") or {}
        seed = max(0.0, (_map_quantile(qs, seed_quantile) - low) / span)
        extent = max(0.0, (_map_quantile(qs, extent_quantile) - low) / span)
    elif method == "tail":
        local = calibration_entry.get("local_peaks") or [[float(v)] for v in peaks]
        seed = max(0.0, (tail_level(local, _rate(seed_quantile)) - low) / span)
        extent = max(0.0, (tail_level(local, _rate(extent_quantile)) - low) / span)
    elif method == "quantile":
        cal = np.clip((peaks - low) / span, 0.0, None)
        seed = float(np.percentile(cal, seed_quantile))
        extent = float(np.percentile(cal, extent_quantile))
    else:
        raise ValueError(f"unknown level method {method!r}: 'auto', 'pixel', 'tail' or 'quantile'")
    return NormalLevels(seed=float(seed), extent=float(min(extent, seed)), extent_quantile=float(extent_quantile), method=method,
                        seed_quantile=float(seed_quantile))


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


def no_regions_reason(bank, k: int = defaults.K) -> str:
    """Why the regions prompt is not the volumes' default with ``bank`` (see :func:`regions_supported`)
    and what to do: one sentence for the command line's warning and the dock's bank box."""
    if normal_peak_count(bank, k) == 0:
        return ("its calibration holds no held-out normal slices, so volumes get the per-slice prompt, which puts "
                "a mask on every slice; rebuild the bank from normal slices of at least one source for the regions default")
    return (f"its calibration cannot place region levels (fewer than {MIN_NORMAL_PEAKS} held-out normal slices, and "
            "no pixel percentiles: a bank built before they were recorded), so volumes get the per-slice prompt, which "
            "puts a mask on every slice; rebuild the bank with `mias-sam build-bank` for the regions default")


def regions_supported(bank, k: int = defaults.K) -> bool:
    """Whether the regions prompt is the volumes' *default* with this bank: its calibration places
    the levels (:func:`normal_levels`) from at least :data:`MIN_NORMAL_PEAKS` held-out slices'
    peaks, or, for a smaller bank, from the pixel percentiles of its held-out maps
    (``map_quantiles``, recorded since issue 20). A bank without calibration, or a small one built
    before those were recorded, gives the backbone's per-slice prompt, as it did when it was made
    (``--prompt regions`` still runs with it, on the tail fit)."""
    n = normal_peak_count(bank, k)
    entry = calibration_entry(bank.manifest.get("calibration"), k) or {}
    return n >= MIN_NORMAL_PEAKS or (n >= 1 and bool(entry.get("map_quantiles")))


def region_cores(maps: np.ndarray, labels: np.ndarray, levels: NormalLevels) -> np.ndarray:
    """(N, H, W) bool: the regions' pixels where calibrated ``maps`` exceed the seed level."""
    return (np.asarray(labels) > 0) & (np.asarray(maps) > levels.seed)
