"""Anomalous regions: levels from the bank's normal calibration only, hysteresis in 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mias_sam.method.regions import (
    CORE_PAD,
    MIN_NORMAL_PEAKS,
    anomalous_regions,
    decode_regions,
    normal_levels,
    normal_peak_count,
    region_cores,
    regions_supported,
    slice_regions,
)
from napari_mias_sam.pipeline.settings import SegmentSettings, resolve_defaults
from napari_mias_sam.backbones.base import Decoded

# A calibration entry as build-bank writes it: raw map levels and held-out normal slices' peaks.
ENTRY = {"low": 1.0, "high": 3.0, "slice_max_map": [2.0, 2.2, 2.6, 3.0, 3.4]}


def blob(shape, centre, radius, value):
    rr, cc = np.indices(shape)
    return np.where((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2, value, 0.0)


def test_levels_come_from_the_normal_peaks_only():
    lv = normal_levels(ENTRY, extent_quantile=50, seed_quantile=100)
    # calibrated peaks: (p - 1) / 2 -> 0.5, 0.6, 0.8, 1.0, 1.2
    assert lv.seed == pytest.approx(1.2)  # no held-out normal slice went above it
    assert lv.extent == pytest.approx(0.8)  # the median normal peak
    assert normal_levels(ENTRY, extent_quantile=0).extent == pytest.approx(0.5)
    default = normal_levels(ENTRY)  # the 97th and 95th percentiles of the normal peaks (linear interpolation)
    assert default.seed == pytest.approx(1.176) and default.extent == pytest.approx(1.16)
    with pytest.raises(ValueError, match="no held-out normal slice peaks"):
        normal_levels({"low": 0, "high": 1, "slice_max_map": []})


def test_two_lesions_on_one_slice_are_two_regions_and_normal_slices_get_none():
    lv = normal_levels(ENTRY, extent_quantile=50, seed_quantile=100)
    maps = np.zeros((3, 64, 64), np.float32)
    maps[1] = blob((64, 64), (16, 16), 5, 2.0) + blob((64, 64), (45, 48), 6, 1.6)
    maps[0] = blob((64, 64), (30, 30), 8, 1.1)  # raised, but below what normal slices reach
    lab = anomalous_regions(maps, lv, three_d=False)
    assert not lab[0].any() and not lab[2].any()
    regs = slice_regions(lab[1], maps[1])
    assert len(regs) == 2
    assert regs[0].peak == pytest.approx(2.0)  # most anomalous first
    x0, y0, x1, y1 = regs[0].box
    assert (x0, y0, x1, y1) == (11.0, 11.0, 21.0, 21.0)


def test_3d_regions_carry_to_neighbours_above_the_extent_level():
    lv = normal_levels(ENTRY, extent_quantile=50, seed_quantile=100)
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


def test_box_prompts_surround_the_core_and_masks_stay_inside_their_region():
    """A wide, low region with a small hot core: the box is the core's box widened by one patch
    radius (not the whole region), and a decoder mask that spills out is clipped to the region."""
    lv = normal_levels(ENTRY, extent_quantile=50, seed_quantile=100)  # extent 0.8, seed 1.2
    m = np.zeros((1, 128, 128), np.float32)
    m[0] = blob((128, 128), (64, 64), 40, 1.0) + blob((128, 128), (60, 70), 4, 0.5)  # core: the 1.5 blob
    lab = anomalous_regions(m, lv, three_d=True)
    cores = region_cores(m, lab, lv)
    assert cores.sum() == blob((128, 128), (60, 70), 4, 1).sum()
    (reg,) = slice_regions(lab[0], m[0], core=cores[0])
    assert reg.extent_box == (24.0, 24.0, 104.0, 104.0)
    assert reg.box == (66 - CORE_PAD, 56 - CORE_PAD, 74 + CORE_PAD, 64 + CORE_PAD)
    (whole,) = slice_regions(lab[0], m[0])  # without cores: the region's own box
    assert whole.box == whole.extent_box

    class Spill:  # a decoder whose every mask covers the whole frame
        def decode(self, emb, prompt):
            self.prompt = prompt
            return Decoded(logits=np.full((3, 128, 128), 4.0, np.float32), iou=np.array([0.5, 0.6, 0.7], np.float32))

    dec = Spill()
    logits, ious, prompt = decode_regions(dec, np.zeros((256, 64, 64), np.float32), lab[0], m[0], core=cores[0])
    assert prompt.box == reg.box == dec.prompt.box
    assert ((logits > 0) == (lab[0] > 0)[None]).all()  # clipped to the region, each of the 3 masks
    assert ious.tolist() == pytest.approx([0.5, 0.6, 0.7])


class _Bank:
    """What the default-prompt choice reads of a bank: its calibration's held-out normal peaks."""

    def __init__(self, n_peaks: int):
        self.manifest = {"calibration": {"per_k": {"1": {"low": 0.0, "high": 1.0, "slice_max_map": [0.5] * n_peaks}}}}


@pytest.mark.parametrize("peaks, volume, prompt, mask", [
    (MIN_NORMAL_PEAKS, True, "regions", 1),  # enough normal peaks: 3D regions, decoder mask 1
    (MIN_NORMAL_PEAKS - 1, True, "cog-box", 3),  # too few to tell the 97th percentile from the max
    (500, False, "cog-box", 3),  # 2D slice sets keep the paper's per-slice prompt and mask
])
def test_volume_default_prompt_and_mask(peaks, volume, prompt, mask):
    bank = _Bank(peaks)
    assert MIN_NORMAL_PEAKS == 34 and normal_peak_count(bank) == peaks
    st = resolve_defaults(SegmentSettings(), "litemedsam", volume=volume, regions_ok=regions_supported(bank))
    assert (st.prompt, st.mask_index) == (prompt, mask)
    chosen = resolve_defaults(SegmentSettings(mask_index=3, prompt="regions"), "litemedsam", regions_ok=False)
    assert (chosen.prompt, chosen.mask_index) == ("regions", 3)  # what the user chose is kept
    assert resolve_defaults(SegmentSettings(), "sam-vit_b", volume=False).prompt == "cog-point"
