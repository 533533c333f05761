"""Threshold-free prompts: the centre of gravity (Eq. 2), the moment box, the maximum point and
the thresholded-box ablation, on maps whose answers are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mias_sam.method.prompts import Prompt
from napari_mias_sam.method.prompts import (
    centre_of_gravity,
    cog_box,
    cog_point,
    make_prompt,
    max_point,
    threshold_boxes,
)
from napari_mias_sam.method.prompts import (
    BACKBONE_PROMPTS,
    PROMPT_RULES,
    PROMPT_TYPES,
    default_prompt_for,
    point_prompts_work,
)


def gaussian(shape, centre_xy, sigma_xy):
    rows, cols = np.indices(shape).astype(np.float64)
    (xc, yc), (sx, sy) = centre_xy, sigma_xy
    return np.exp(-((cols - xc) ** 2) / (2 * sx**2) - ((rows - yc) ** 2) / (2 * sy**2))


# --------------------------------------------------------------------------- centre of gravity
def test_single_hot_pixel_is_the_cog():
    m = np.zeros((40, 50))
    m[7, 31] = 0.3
    assert centre_of_gravity(m) == (31.0, 7.0)  # (x = column, y = row)
    assert cog_point is centre_of_gravity


def test_two_pixels_weighted_mean_and_gamma():
    m = np.zeros((10, 10))
    m[4, 0] = 1.0
    m[4, 3] = 2.0
    # gamma = 1: x = (0 * 1 + 3 * 2) / (1 + 2) = 2
    x, y = centre_of_gravity(m, gamma=1.0)
    assert x == pytest.approx(2.0, abs=1e-12) and y == pytest.approx(4.0, abs=1e-12)
    # gamma = 2: x = 3 * 4 / (1 + 4) = 2.4 ; gamma = 5: x = 3 * 32 / 33
    assert centre_of_gravity(m, gamma=2.0)[0] == pytest.approx(2.4, abs=1e-12)
    assert centre_of_gravity(m, gamma=5.0)[0] == pytest.approx(96 / 33, abs=1e-12)
    # raising gamma moves the CoG monotonically toward the maximum (x = 3)
    xs = [centre_of_gravity(m, gamma=g)[0] for g in (0.5, 1, 2, 5, 20)]
    assert all(a < b for a, b in zip(xs, xs[1:])) and xs[-1] < 3.0
    assert xs[0] == pytest.approx(3 * 2**0.5 / (1 + 2**0.5), abs=1e-12)


def test_scale_invariance_and_no_overflow():
    m = np.zeros((10, 10))
    m[2, 2], m[8, 5] = 1e200, 3e200  # I**5 would overflow float64 without normalising first
    x, y = centre_of_gravity(m, gamma=5.0)
    w1, w2 = 1.0, 3.0**5
    assert x == pytest.approx((2 * w1 + 5 * w2) / (w1 + w2), rel=1e-12)
    assert y == pytest.approx((2 * w1 + 8 * w2) / (w1 + w2), rel=1e-12)


def test_gaussian_cog_is_its_centre():
    m = gaussian((128, 128), (64.3, 60.7), (5.0, 8.0))
    x, y = centre_of_gravity(m, gamma=5.0)
    assert x == pytest.approx(64.3, abs=1e-6) and y == pytest.approx(60.7, abs=1e-6)


def test_no_prompt_for_zero_nan_or_negative_maps():
    assert centre_of_gravity(np.zeros((8, 8))) is None
    nan = np.ones((8, 8))
    nan[3, 3] = np.nan
    assert centre_of_gravity(nan) is None
    inf = np.ones((8, 8))
    inf[0, 0] = np.inf
    assert centre_of_gravity(inf) is None
    assert centre_of_gravity(-np.ones((8, 8))) is None
    assert cog_box(np.zeros((8, 8))) is None and cog_box(nan) is None
    with pytest.raises(ValueError, match="2D"):
        centre_of_gravity(np.ones((2, 8, 8)))


def test_negative_values_are_clipped():
    m = np.full((6, 6), -5.0)
    m[1, 4] = 1.0
    m[5, 0] = -100.0  # a huge negative would pull the CoG if it were not clipped to 0
    assert centre_of_gravity(m, gamma=1.0) == (4.0, 1.0)
    m[3, 2] = 1.0
    assert centre_of_gravity(m, gamma=1.0) == pytest.approx((3.0, 2.0))


# --------------------------------------------------------------------------- moment box
def test_cog_box_of_a_gaussian_is_centre_plus_minus_two_sigma():
    sx, sy = 5.0, 8.0
    m = gaussian((128, 128), (64.0, 60.0), (sx, sy))
    x0, y0, x1, y1 = cog_box(m, gamma=1.0)
    assert (x0, y0, x1, y1) == pytest.approx((64 - 2 * sx, 60 - 2 * sy, 64 + 2 * sx, 60 + 2 * sy), abs=1e-4)
    # I**gamma of a Gaussian is a Gaussian with sigma / sqrt(gamma)
    for gamma in (2.0, 5.0):
        hx, hy = 2 * sx / gamma**0.5, 2 * sy / gamma**0.5
        assert cog_box(m, gamma=gamma) == pytest.approx((64 - hx, 60 - hy, 64 + hx, 60 + hy), abs=1e-4)
    # n_sigma scales the half-sides
    assert cog_box(m, gamma=1.0, n_sigma=1.0) == pytest.approx((64 - sx, 60 - sy, 64 + sx, 60 + sy), abs=1e-4)


def test_cog_box_is_clipped_to_the_map():
    m = gaussian((100, 100), (3.0, 95.0), (4.0, 4.0))
    x0, y0, x1, y1 = cog_box(m, gamma=1.0)
    assert x0 == 0.0 and y1 == 99.0  # clipped at the left and bottom borders
    # the unclipped sides are the (truncated) map's CoG + / - 2 sigma
    assert x1 == pytest.approx(centre_of_gravity(m, 1.0)[0] + 2 * np.sqrt(_var(m, axis=1)), abs=1e-9)
    assert y0 == pytest.approx(centre_of_gravity(m, 1.0)[1] - 2 * np.sqrt(_var(m, axis=0)), abs=1e-9)


def _var(m, axis):
    """Weighted variance of column (axis=1) or row (axis=0) indices, computed independently."""
    w = m / m.sum()
    idx = np.indices(m.shape)[1 if axis == 1 else 0]
    mu = (w * idx).sum()
    return (w * (idx - mu) ** 2).sum()


def test_cog_box_minimum_side():
    m = np.zeros((50, 50))
    m[20, 10] = 1.0  # zero spread -> the minimum side (4 px) around the pixel
    assert cog_box(m) == (8.0, 18.0, 12.0, 22.0)
    assert cog_box(m, min_side=10) == (5.0, 15.0, 15.0, 25.0)
    m2 = np.zeros((50, 50))
    m2[0, 49] = 1.0  # in a corner: minimum side, then clipped
    assert cog_box(m2) == (47.0, 0.0, 49.0, 2.0)


# --------------------------------------------------------------------------- ablation prompts
def test_max_point():
    m = np.zeros((20, 30))
    m[7, 3] = 0.9
    m[15, 20] = 0.5
    assert max_point(m) == (3.0, 7.0)
    assert max_point(np.zeros((5, 5))) is None
    bad = m.copy()
    bad[0, 0] = np.nan
    assert max_point(bad) is None


def test_threshold_boxes_two_blobs_exact():
    m = np.zeros((50, 60))
    m[5:10, 10:15] = 0.8  # rows 5..9, cols 10..14
    m[30:35, 40:50] = 0.9  # rows 30..34, cols 40..49
    m[20, 0:60] = 0.5  # exactly at the threshold: not > 0.5, no blob
    boxes = threshold_boxes(m, 0.5)
    assert boxes == [(10.0, 5.0, 14.0, 9.0), (40.0, 30.0, 49.0, 34.0)]
    p = make_prompt(m, "threshold-box")
    assert p == Prompt("boxes", boxes=((10.0, 5.0, 14.0, 9.0), (40.0, 30.0, 49.0, 34.0)))
    m[30:35, 40:50] = 0.0
    assert make_prompt(m, "threshold-box") == Prompt("box", box=(10.0, 5.0, 14.0, 9.0))
    assert threshold_boxes(m, 0.9) == []


def test_make_prompt_kinds_and_empty_maps():
    m = np.zeros((64, 64))
    for kind in (k for k in PROMPT_TYPES if PROMPT_RULES[k].scope == "slice"):  # regions: made per volume
        assert make_prompt(m, kind) is None, kind
        assert make_prompt(np.full((64, 64), np.nan), kind) is None, kind
    m[10, 20] = 1.0
    assert make_prompt(m, "cog-point") == Prompt("point", point=(20.0, 10.0))
    assert make_prompt(m, "max-point") == Prompt("point", point=(20.0, 10.0))
    assert make_prompt(m, "cog-box") == Prompt("box", box=(18.0, 8.0, 22.0, 12.0))
    assert make_prompt(m, "threshold-box") == Prompt("box", box=(20.0, 10.0, 20.0, 10.0))
    with pytest.raises(ValueError, match="unknown prompt type"):
        make_prompt(m, "centroid")


# ------------------------------------------------------------------ the prompt table


def test_every_prompt_rule_gives_its_declared_shape_and_reads_what_it_declares():
    amap = np.zeros((64, 64))
    amap[10:20, 30:44] = 1.0
    amap[40:50, 5:12] = 0.8
    for name, rule in PROMPT_RULES.items():
        if rule.scope == "volume":  # made by the pipeline from the whole volume, never from one map
            with pytest.raises(ValueError, match="per volume"):
                make_prompt(amap, name)
            continue
        p = make_prompt(amap, name)
        assert p is not None and p.kind in (rule.shape, rule.shape + "es"), (name, p)
        # a setting the rule does not read does not change its prompt; one it reads can
        for setting, values in (("gamma", (1.0, 8.0)), ("threshold", (0.5, 0.9))):
            a, b = (make_prompt(amap, name, **{setting: v}) for v in values)
            assert (a != b) == (setting in rule.reads), (name, setting)
    assert PROMPT_TYPES == tuple(PROMPT_RULES)


def test_backbone_prompt_defaults_come_from_the_table():
    assert default_prompt_for("litemedsam") == BACKBONE_PROMPTS["litemedsam"].default == "cog-box"
    assert not point_prompts_work("litemedsam")
    for name in ("sam-vit_b", "sam-vit_l", "sam-vit_h", "a-test-fake"):
        assert default_prompt_for(name) == "cog-point" and point_prompts_work(name)
    assert all(r.default in PROMPT_RULES for r in BACKBONE_PROMPTS.values())
