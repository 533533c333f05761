"""Lesion-wise evaluation (BraTS 2023 rule), checked against panoptica, the maintained
implementation behind the official brats-evaluation package, and on scenes drawn by hand."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from napari_mias_sam.evaluation.lesionwise import LesionwiseRule, hd95, lesionwise


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(float)
    d2 = sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return d2 <= radius**2


def _scene(rng: np.random.Generator, shape=(48, 48, 40)):
    """True lesions far apart; each predicted as a shifted, resized ball (some split in two, some
    missed) and a few false positives away from every true lesion. Each predicted lesion overlaps
    at most one true lesion, where BraTS's rule and panoptica's many-to-one matching agree."""
    gt = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    cells = [(x, y, z) for x in (10, 36) for y in (10, 36) for z in (10, 30)]
    rng.shuffle(cells)
    n_gt = int(rng.integers(2, 6))
    for c in cells[:n_gt]:
        r = float(rng.uniform(2.5, 5.5))
        gt |= _ball(shape, c, r)
        fate = rng.uniform()
        if fate < 0.2:
            continue  # missed
        shift = rng.integers(-2, 3, size=3)
        pr = r * float(rng.uniform(0.6, 1.3))
        p = _ball(shape, tuple(np.add(c, shift)), pr)
        if fate > 0.8:  # split in two along x
            p[c[0] + shift[0], :, :] = False
        pred |= p
    for c in cells[n_gt: n_gt + int(rng.integers(0, 3))]:  # false positives in empty cells
        pred |= _ball(shape, c, float(rng.uniform(1.5, 3.0)))
    return pred, gt


def _panoptica(pred: np.ndarray, gt: np.ndarray):
    panoptica = pytest.importorskip("panoptica")
    from panoptica.metrics import Metric, MetricMode

    ev = panoptica.Panoptica_Evaluator(
        expected_input=panoptica.InputType.SEMANTIC,
        instance_approximator=panoptica.ConnectedComponentsInstanceApproximator(),
        instance_matcher=panoptica.NaiveThresholdMatching(matching_metric=Metric.IOU, matching_threshold=1e-9,
                                                          allow_many_to_one=True),
        instance_metrics=[Metric.DSC, Metric.HD95], global_metrics=[Metric.DSC])
    r = ev.evaluate(pred.astype(np.uint8), gt.astype(np.uint8), verbose=False)["ungrouped"]
    dices = sorted(r.get_list_metric(Metric.DSC, MetricMode.ALL)) if r.tp else []
    hds = sorted(r.get_list_metric(Metric.HD95, MetricMode.ALL)) if r.tp else []
    return r, dices, hds


# panoptica pins numpy<2.3 and pandas<3, which drags a fresh test environment back to an old napari,
# so it is not a test dependency: its answers on these scenes are recorded in
# panoptica_reference.json (written by ``python tests/evaluation/test_lesionwise.py`` where
# panoptica is installed) and checked against a live panoptica wherever one is.
REFERENCE = Path(__file__).with_name("panoptica_reference.json")
SEEDS = range(8)


def _aniso_cases():
    rng = np.random.default_rng(3)
    for _ in range(4):
        sp = tuple(float(s) for s in rng.uniform(0.5, 3.0, size=3))
        a = _ball((30, 30, 30), (14, 15, 13), 6, sp)
        b = _ball((30, 30, 30), tuple(rng.uniform(12, 17, size=3)), float(rng.uniform(4, 8)), sp)
        yield a, b, sp


def _reference_from_panoptica() -> dict:
    from panoptica.metrics.hausdorff_distance import _compute_hausdorff_distance95

    scenes = {}
    for seed in SEEDS:
        r, dices, hds = _panoptica(*_scene(np.random.default_rng(seed)))
        scenes[str(seed)] = {"gt_lesions": int(r.n_ref_instances), "tp": int(r.tp), "fn": int(r.fn),
                             "fp": int(r.fp), "dice": [float(d) for d in dices], "hd95": [float(h) for h in hds]}
    aniso = [float(_compute_hausdorff_distance95(a, b, voxelspacing=sp)) for a, b, sp in _aniso_cases()]
    return {"panoptica": version("panoptica"), "scenes": scenes, "hd95_anisotropic": aniso}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("seed", SEEDS)
def test_counts_dice_and_hd95_match_panoptica(seed, reference):
    pred, gt = _scene(np.random.default_rng(seed))
    ours = lesionwise(pred, gt, rule=LesionwiseRule(dilation=0, gt_min_volume_mm3=0))
    ref = reference["scenes"][str(seed)]
    assert ours["gt_lesions"] == ref["gt_lesions"]
    # (panoptica's n_pred_instances counts the predicted lesions matched to one true lesion as one)
    assert ours["detected"] == ref["tp"]
    assert ours["missed"] == ref["fn"]
    assert ours["false_positives"] == ref["fp"]
    det = [r for r in ours["gt"] if r["status"] == "detected"]
    np.testing.assert_allclose(sorted(r["dice"] for r in det), ref["dice"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sorted(r["hd95"] for r in det), ref["hd95"], rtol=1e-9, atol=1e-9)


def test_hd95_matches_panoptica_with_anisotropic_spacing(reference):
    for (a, b, sp), ref in zip(_aniso_cases(), reference["hd95_anisotropic"], strict=True):
        assert hd95(a, b, sp) == pytest.approx(ref, rel=1e-9)


def test_the_recorded_reference_is_panopticas_answer(reference):
    """Where panoptica is installed (a developer's environment), the recorded answers are its own."""
    pytest.importorskip("panoptica")
    live = _reference_from_panoptica()
    assert live["scenes"] == reference["scenes"]
    np.testing.assert_allclose(live["hd95_anisotropic"], reference["hd95_anisotropic"], rtol=1e-12)


def test_dilation_counts_a_near_miss_as_detected_and_combines_neighbours():
    shape = (40, 40, 40)
    gt = _ball(shape, (10, 10, 10), 4)
    near = _ball(shape, (10, 10, 17), 2)  # 2 voxels from the true lesion's surface: inside its 3-voxel dilation
    far = _ball(shape, (30, 30, 30), 3)
    res = lesionwise(near | far, gt, rule=LesionwiseRule(dilation=3, gt_min_volume_mm3=0))
    assert (res["detected"], res["missed"], res["false_positives"]) == (1, 0, 1)
    assert res["gt"][0]["dice"] == 0.0  # detected, but no overlap
    assert res["lesionwise_dice"] == 0.0
    # without the dilation the near miss is a false positive and the true lesion is missed
    res0 = lesionwise(near | far, gt, rule=LesionwiseRule(dilation=0, gt_min_volume_mm3=0))
    assert (res0["detected"], res0["missed"], res0["false_positives"]) == (0, 1, 2)
    assert res0["lesionwise_hd95"] == 374.0
    # two true lesions 2 voxels apart are one lesion once dilated
    two = _ball(shape, (10, 10, 10), 3) | _ball(shape, (10, 10, 18), 3)
    assert lesionwise(two, two, rule=LesionwiseRule(dilation=3, gt_min_volume_mm3=0))["gt_lesions"] == 1
    assert lesionwise(two, two, rule=LesionwiseRule(dilation=0, gt_min_volume_mm3=0))["gt_lesions"] == 2


def test_lesionwise_dice_penalises_false_positives_and_skips_tiny_true_lesions():
    shape = (40, 40, 40)
    gt = _ball(shape, (10, 10, 10), 5)
    tiny = np.zeros(shape, bool)
    tiny[30, 30, 30:33] = True  # 3 voxels: below 50 mm^3
    pred = gt | _ball(shape, (30, 10, 30), 2)
    res = lesionwise(pred, gt | tiny)
    assert res["too_small"] == 1 and res["gt_lesions"] == 1
    assert res["detected"] == 1 and res["false_positives"] == 1
    assert res["lesionwise_dice"] == pytest.approx(0.5)  # (1 + 0) / (1 true + 1 false positive)
    assert res["lesionwise_hd95"] == pytest.approx(374.0 / 2)
    empty = lesionwise(np.zeros(shape, bool), np.zeros(shape, bool))
    assert empty["lesionwise_dice"] == 1.0 and empty["lesionwise_hd95"] == 0.0


def test_given_lesion_ids_are_the_predicted_lesions():
    shape = (30, 30, 30)
    gt = _ball(shape, (15, 15, 15), 5)
    labels = np.zeros(shape, np.int32)
    labels[_ball(shape, (15, 15, 15), 4)] = 7
    res = lesionwise(labels > 0, gt, pred_labels=labels, rule=LesionwiseRule(gt_min_volume_mm3=0))
    assert res["pred"] == [{"id": 7, "voxels": int((labels == 7).sum()), "status": "matched", "gt_ids": [1]}]
    assert res["gt"][0]["pred_ids"] == [7]


if __name__ == "__main__":  # re-record the reference (needs panoptica)
    REFERENCE.write_text(json.dumps(_reference_from_panoptica(), indent=1) + "\n")
    print(f"wrote {REFERENCE}")
