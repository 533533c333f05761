"""Lesions as objects: labelling rules, the table's geometry and scores, prompts, removal."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mias_sam.method.lesions import (
    LESION_COLUMNS,
    LesionRule,
    assign_prompts,
    describe_lesions,
    label_lesions,
    lesion_rows,
    min_voxels_for_ml,
    remove_lesions,
)


def _mask():
    m = np.zeros((20, 20, 10), np.uint8)
    m[2:6, 2:6, 2:5] = 1  # 48 voxels
    m[10:12, 10:12, 6:8] = 1  # 8 voxels
    m[12, 12, 8] = 1  # touches the 8-voxel block by a corner only
    m[18, 18, 0] = 1  # a lone voxel
    return m


def test_ids_run_from_the_largest_and_follow_connectivity_and_minimum():
    lab = label_lesions(_mask(), LesionRule(connectivity=26, min_voxels=1))
    assert lab.max() == 3 and lab.dtype == np.int32
    assert (lab == 1).sum() == 48 and (lab == 2).sum() == 9 and (lab == 3).sum() == 1  # corner joins at 26
    lab6 = label_lesions(_mask(), LesionRule(connectivity=6, min_voxels=1))
    assert lab6.max() == 4 and (lab6 == 2).sum() == 8
    lab_min = label_lesions(_mask(), LesionRule(connectivity=6, min_voxels=2))
    assert lab_min.max() == 2 and lab_min[12, 12, 8] == 0 and lab_min[18, 18, 0] == 0
    with pytest.raises(ValueError, match="connectivity"):
        LesionRule(connectivity=8)
    with pytest.raises(ValueError, match="at least 1"):
        LesionRule(min_voxels=0)


def test_volume_centroid_and_scores_follow_the_affine():
    aff = np.diag([2.0, 1.0, 3.0, 1.0])
    aff[:3, 3] = [-10, 5, 100]
    lab = label_lesions(_mask(), LesionRule(min_voxels=2))
    scores = np.zeros(lab.shape, np.float32)
    scores[lab == 1] = 0.5
    scores[3, 3, 3] = 2.0
    les = describe_lesions(lab, aff, axis=2, scores=scores)
    first = les[0]
    assert first.id == 1 and first.voxels == 48
    assert first.volume_ml == pytest.approx(48 * 6 / 1000)
    assert first.slice_range == (2, 4)
    assert first.centroid_voxel == pytest.approx((3.5, 3.5, 3.0))
    assert first.centroid_mm == pytest.approx((-10 + 7.0, 5 + 3.5, 100 + 9.0))
    assert first.peak_score == pytest.approx(2.0)
    assert first.mean_score == pytest.approx((47 * 0.5 + 2.0) / 48)
    assert min_voxels_for_ml(0.012, aff) == 2  # 12 mm^3 of 6 mm^3 voxels
    rows = lesion_rows(les)
    assert list(rows[0]) == list(LESION_COLUMNS) and rows[0]["volume_ml"] == pytest.approx(0.288)


def test_prompts_go_to_the_lesion_under_or_nearest_them():
    lab = label_lesions(_mask(), LesionRule(min_voxels=2))
    centres = {3: [("box", (3.0, 3.0, 3.0))], 6: [("point", (0.0, 0.0, 6.0))], 9: [("box", (5.0, 5.0, 9.0))]}
    got = assign_prompts(lab, 2, centres)
    assert got == {1: ["3:box@3.0,3.0,3.0"], 2: ["6:point@0.0,0.0,6.0"]}  # slice 9 holds no lesion


def test_removing_a_lesion_keeps_the_other_ids():
    m = _mask()
    lab = label_lesions(m, LesionRule(min_voxels=1))
    lab2, m2 = remove_lesions(lab, m, [2])
    assert not (lab2 == 2).any() and (lab2 == 3).sum() == 1 and (lab2 == 1).sum() == 48
    assert m2.sum() == m.sum() - 9 and m2.dtype == m.dtype
