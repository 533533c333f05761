"""Anomalous regions: levels from the bank's normal calibration only, hysteresis in 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mias_sam.method.regions import (
    MIN_NORMAL_PEAKS,
    PIXEL_EXTENT_QUANTILE,
    PIXEL_SEED_QUANTILE,
    anomalous_regions,
    local_peaks,
    normal_levels,
    normal_peak_count,
    region_cores,
    regions_supported,
    tail_level,
)
from napari_mias_sam.method.region_prompts import decode_regions, region_prompts
from napari_mias_sam.pipeline.settings import SegmentSettings, resolve_defaults
from napari_mias_sam.backbones.base import Decoded

# A calibration entry as build-bank writes it: raw map levels and held-out normal slices' peaks.
ENTRY = {"low": 1.0, "high": 3.0, "slice_max_map": [2.0, 2.2, 2.6, 3.0, 3.4]}


def blob(shape, centre, radius, value):
    rr, cc = np.indices(shape)
    return np.where((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2, value, 0.0)


def test_small_banks_place_levels_at_pixel_percentiles_of_the_held_out_maps():
    """Fewer than MIN_NORMAL_PEAKS held-out slices: seed and extent are percentiles of every pixel
    of the held-out normal maps (recorded at build time), interpolated between those recorded; in
    calibrated units, and the same whatever the number of slices."""
    qs = {"50": 1.0, "99": 2.0, "99.5": 2.4, "99.9": 2.8, "100": 3.5}
    entry = {**ENTRY, "map_quantiles": qs}
    lv = normal_levels(entry)
    assert lv.method == "pixel" and (lv.seed_quantile, lv.extent_quantile) == (PIXEL_SEED_QUANTILE, PIXEL_EXTENT_QUANTILE)
    raw = lambda q: float(np.interp(q, [50, 99, 99.5, 99.9, 100], [1.0, 2.0, 2.4, 2.8, 3.5]))
    assert lv.seed == pytest.approx((raw(PIXEL_SEED_QUANTILE) - 1.0) / 2.0)
    assert lv.extent == pytest.approx((raw(PIXEL_EXTENT_QUANTILE) - 1.0) / 2.0) and lv.extent <= lv.seed
    assert normal_levels({**entry, "slice_max_map": [2.0] * MIN_NORMAL_PEAKS}).method == "quantile"  # as shipped
    assert normal_levels(entry, method="pixel", seed_quantile=99.5, extent_quantile=99).seed == pytest.approx(0.7)
    assert "pixel" in lv.describe() and f"q{PIXEL_SEED_QUANTILE:g}" in lv.describe()
    with pytest.raises(ValueError, match="no pixel percentiles"):
        normal_levels(ENTRY, method="pixel")


def test_levels_come_from_the_normal_peaks_only():
    lv = normal_levels(ENTRY, extent_quantile=50, seed_quantile=100, method="quantile")
    # calibrated peaks: (p - 1) / 2 -> 0.5, 0.6, 0.8, 1.0, 1.2
    assert lv.seed == pytest.approx(1.2)  # no held-out normal slice went above it
    assert lv.extent == pytest.approx(0.8)  # the median normal peak
    assert normal_levels(ENTRY, extent_quantile=0, method="quantile").extent == pytest.approx(0.5)
    # the 97th and 95th percentiles of the normal peaks (linear interpolation)
    q = normal_levels(ENTRY, method="quantile")
    assert q.seed == pytest.approx(1.176) and q.extent == pytest.approx(1.16) and q.method == "quantile"
    auto = normal_levels(ENTRY)  # 5 held-out slices, a bank made before pixel percentiles were kept: the tail fit
    assert auto.method == "tail" and auto.extent_quantile == 85.0 and auto.extent <= auto.seed
    assert normal_levels({**ENTRY, "slice_max_map": [2.0] * MIN_NORMAL_PEAKS}).method == "quantile"
    with pytest.raises(ValueError, match="no held-out normal slice peaks"):
        normal_levels({"low": 0, "high": 1, "slice_max_map": []})


def test_two_lesions_on_one_slice_are_two_regions_and_normal_slices_get_none():
    lv = normal_levels(ENTRY, extent_quantile=50, seed_quantile=100, method="quantile")
    maps = np.zeros((3, 64, 64), np.float32)
    maps[1] = blob((64, 64), (16, 16), 5, 2.0) + blob((64, 64), (45, 48), 6, 1.6)
    maps[0] = blob((64, 64), (30, 30), 8, 1.1)  # raised, but below what normal slices reach
    lab = anomalous_regions(maps, lv, three_d=False)
    assert not lab[0].any() and not lab[2].any()
    regs = region_prompts(lab[1], maps[1], kind="point")
    assert len(regs) == 2
    assert regs[0].peak == pytest.approx(2.0)  # most anomalous first
    assert regs[0].centre == pytest.approx((16.0, 16.0)) and regs[0].prompt.point == regs[0].centre
    assert regs[0].extent_box == (11.0, 11.0, 21.0, 21.0)


def test_3d_regions_carry_to_neighbours_above_the_extent_level():
    lv = normal_levels(ENTRY, extent_quantile=50, seed_quantile=100, method="quantile")
    maps = np.zeros((4, 32, 32), np.float32)
    maps[1] = blob((32, 32), (16, 16), 4, 1.5)  # a seed: above every normal peak
    maps[2] = blob((32, 32), (16, 17), 4, 1.0)  # below the seed, above the extent: carried in 3D
    maps[3] = blob((32, 32), (16, 17), 4, 0.6)  # back to normal levels: stops
    lab3 = anomalous_regions(maps, lv, three_d=True)
    assert lab3[1].any() and lab3[2].any() and not lab3[3].any() and not lab3[0].any()
    assert set(np.unique(lab3[1:3])) == {0, 1}  # one 3D object
    lab2 = anomalous_regions(maps, lv, three_d=False)
    assert lab2[1].any() and not lab2[2].any()


def test_foreground_and_empty_maps():
    lv = normal_levels(ENTRY)
    maps = np.full((2, 16, 16), 5.0, np.float32)
    assert not anomalous_regions(maps, lv, foreground=np.array([False, False])).any()
    assert not anomalous_regions(np.zeros((2, 16, 16)), lv).any()


def test_tail_levels_hold_with_one_subject_and_use_every_local_maximum():
    """A bank from one subject: 12 held-out normal maps (fewer than a 97th percentile needs). The
    tail fit of their local maxima gives a seed above most of them and below the rare top ones,
    not simply the largest peak, and an extent below the seed."""
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 1.0, size=(12, 64, 64)).astype(np.float32)
    peaks = local_peaks(maps, top=16, window=9)
    assert all(len(p) == 16 and p == sorted(p, reverse=True) for p in peaks)
    top = max(max(p) for p in peaks)
    entry = {"low": 0.0, "high": 1.0, "slice_max_map": [max(p) for p in peaks], "local_peaks": peaks}
    lv = normal_levels(entry)
    assert lv.method == "tail" and 0 < lv.extent < lv.seed
    # about 3 % of normal slices reach the seed: well up in the slices' peaks, near their top
    assert np.mean([max(p) > lv.seed for p in peaks]) <= 0.25 and lv.seed > 0.8 * top
    assert tail_level(peaks, 1.0) < tail_level(peaks, 0.1) < tail_level(peaks, 0.01)  # rarer: higher
    with pytest.raises(ValueError, match="too few"):
        tail_level([[1.0]], 0.1)


class _Bank:
    """What the default-prompt choice reads of a bank: its calibration's held-out normal peaks."""

    def __init__(self, n_peaks: int, pixels: bool = True):
        entry = {"low": 0.0, "high": 1.0, "slice_max_map": [0.5] * n_peaks}
        if pixels:  # banks built since issue 20 keep the pixel percentiles of their held-out maps
            entry["map_quantiles"] = {"50": 0.0, "99": 0.4, "99.9": 0.5}
        self.manifest = {"calibration": {"per_k": {"1": entry}}}


@pytest.mark.parametrize("peaks, volume, prompt, mask", [
    (MIN_NORMAL_PEAKS, True, "regions", 1),  # enough normal peaks: 3D regions, decoder mask 1
    (MIN_NORMAL_PEAKS - 1, True, "regions", 1),  # too few for a 97th percentile: regions all the same (pixel levels)
    (1, True, "regions", 1),
    (0, True, "cog-box", 3),  # no calibration at all: the per-slice default
    ((MIN_NORMAL_PEAKS - 1, False), True, "cog-box", 3),  # a small bank built before the pixel percentiles: as before
    ((MIN_NORMAL_PEAKS, False), True, "regions", 1),
    (500, False, "cog-box", 3),  # 2D slice sets keep the paper's per-slice prompt and mask
])
def test_volume_default_prompt_and_mask(peaks, volume, prompt, mask):
    peaks, pixels = peaks if isinstance(peaks, tuple) else (peaks, True)
    bank = _Bank(peaks, pixels)
    assert MIN_NORMAL_PEAKS == 34 and normal_peak_count(bank) == peaks
    st = resolve_defaults(SegmentSettings(), "litemedsam", volume=volume, regions_ok=regions_supported(bank))
    assert (st.prompt, st.mask_index) == (prompt, mask)
    chosen = resolve_defaults(SegmentSettings(mask_index=3, prompt="regions"), "litemedsam", regions_ok=False)
    assert (chosen.prompt, chosen.mask_index) == ("regions", 3)  # what the user chose is kept
    assert resolve_defaults(SegmentSettings(), "sam-vit_b", volume=False).prompt == "cog-point"
