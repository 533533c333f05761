"""MIAS-SAM inside each region piece: the gamma-weighted centre of gravity as the prompt, and the
rule that keeps a decoder mask only where it agrees with the map."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mias_sam.backbones.base import Decoded
from napari_mias_sam.method.prompts import make_prompt
from napari_mias_sam.method.region_prompts import (
    AGREEMENT_MIN,
    REGION_OUTCOME,
    choose_mask,
    decode_regions,
    mask_agreement,
    piece_moments,
    region_prompts,
)


def blob(shape, centre, radius, value):
    rr, cc = np.indices(shape)
    return np.where((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2, value, 0.0)


def two_bumps():
    """One region piece holding a high bump (left) and a lower, wider one (right)."""
    m = np.zeros((96, 96), np.float32)
    m += blob(m.shape, (48, 30), 6, 1.0) + blob(m.shape, (48, 62), 12, 0.7) + blob(m.shape, (48, 46), 30, 0.3)
    labels = (m > 0.2).astype(np.int32)
    return m, labels


def test_the_prompt_is_the_gamma_weighted_centre_of_gravity_inside_the_piece():
    m, labels = two_bumps()
    outside = m + blob(m.shape, (10, 10), 5, 5.0)  # a hotter spot outside the piece changes nothing
    for gamma in (1.0, 5.0):
        (reg,) = region_prompts(labels, outside, gamma=gamma, kind="point")
        # the piece's map alone, with the paper's per-slice CoG (Eq. 2), gives the same point
        ref = make_prompt(np.where(labels > 0, m, 0.0), "cog-point", gamma=gamma)
        assert reg.prompt.point == pytest.approx(ref.point, abs=1e-6) and reg.centre == reg.prompt.point
    lo = region_prompts(labels, m, gamma=1.0, kind="box")[0]
    hi = region_prompts(labels, m, gamma=8.0, kind="box")[0]
    assert hi.centre[0] < lo.centre[0] - 3  # gamma pulls the CoG towards the highest bump (left)
    for r in (lo, hi):  # the box is centred on the CoG ...
        x0, y0, x1, y1 = r.prompt.box
        assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx(r.centre)
    assert hi.prompt.box != pytest.approx(lo.prompt.box)  # ... so gamma moves the box sent
    assert piece_moments(np.zeros_like(m), labels > 0, 5.0) is None


def test_a_mask_that_disagrees_with_the_map_is_not_kept_silently():
    """The dark-lesion failure: the mask asked for covers tissue beside the anomaly. Another of
    the decoder's masks that agrees is taken; where none does, the region itself is the mask."""
    shape = (64, 64)
    piece = blob(shape, (32, 32), 12, 1) > 0
    core = blob(shape, (32, 32), 6, 1) > 0
    wrong = blob(shape, (32, 50), 8, 1) > 0  # mostly outside the core
    right = blob(shape, (32, 32), 7, 1) > 0
    assert mask_agreement(wrong, piece, core) < AGREEMENT_MIN <= mask_agreement(right, piece, core)
    kept, outcome, ag = choose_mask(np.stack([wrong, wrong, right]), piece, 1, core=core)
    assert outcome == 3 and (kept == (right & piece)).all() and ag >= AGREEMENT_MIN
    kept, outcome, ag = choose_mask(np.stack([right, wrong, wrong]), piece, 1, core=core)
    assert outcome == 1  # the mask asked for agrees: kept
    kept, outcome, ag = choose_mask(np.stack([wrong, wrong, np.zeros(shape, bool)]), piece, 1, core=core)
    assert outcome == REGION_OUTCOME and (kept == piece).all() and ag < AGREEMENT_MIN
    spill = np.ones(shape, bool)  # a mask over everything is clipped to its piece
    kept, outcome, _ = choose_mask(np.stack([spill, spill, spill]), piece, 1)
    assert (kept == piece).all()


class Recorder:
    """A decoder that records the prompts it was sent; each mask is a fixed disc."""

    def __init__(self, masks):
        self.sent, self.masks = [], masks

    def decode(self, emb, prompt):
        self.sent.append(prompt)
        return Decoded(logits=np.where(self.masks, 4.0, -4.0).astype(np.float32), iou=np.array([0.5, 0.6, 0.7], np.float32))


def test_decode_regions_sends_one_prompt_per_piece_and_records_the_rule():
    m = (blob((64, 64), (16, 16), 5, 1.0) + blob((64, 64), (45, 45), 6, 0.8)).astype(np.float32)
    labels = (m > 0).astype(np.int32)
    labels[m > 0.9] = 1
    labels[(m > 0) & (m <= 0.9)] = 2
    core = m > 0.5
    dec = Recorder(np.stack([blob((64, 64), (16, 16), 5, 1) > 0] * 3))  # every mask on the first lesion only
    d = decode_regions(dec, np.zeros((256, 64, 64), np.float32), labels, m, gamma=5.0, kind="point", core=core)
    assert [p.point for p in dec.sent] == [r.prompt.point for r in d.regions]  # the prompts sent, in order
    assert d.prompt.kind == "points" and list(d.prompt.points) == [r.centre for r in d.regions]
    assert d.outcomes[:, 0].tolist() == [1, 2, 3]  # the first piece keeps the mask asked for
    assert d.outcomes[:, 1].tolist() == [REGION_OUTCOME] * 3  # no mask covers the second: the region
    fg = d.logits[0] > 0
    assert (fg == (labels > 0)).all()  # first lesion's mask + second region
    empty = decode_regions(dec, None, np.zeros_like(labels), m)
    assert empty.prompt is None and not (empty.logits > 0).any() and empty.outcomes.shape == (3, 0)
