"""Evaluation: BMAD readers on generated trees, the evaluation loop, the slice decision's
independence from test labels, and the written report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_mias_sam.method.prompts import default_prompt_for
from napari_mias_sam.method.regions import MIN_NORMAL_PEAKS, normal_peak_count, regions_supported
from PIL import Image

from eval_fixtures import write_eval_set
from napari_mias_sam.evaluation.bmad import find_test_layout, read_bmad_test
from napari_mias_sam.core.errors import InputError
from napari_mias_sam.evaluation.sweep import Ablations, evaluate, units_from_slices, units_from_volumes
from napari_mias_sam.evaluation.report import write_report
from napari_mias_sam.cli.commands import main
from napari_mias_sam.pipeline.settings import SegmentSettings


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _bmad_tree(root, layout="bmad"):
    rng = np.random.default_rng(0)
    for i in range(3):
        img = (rng.random((40, 40)) * 200).astype(np.uint8)
        if layout == "bmad":
            _png(root / "test" / "good" / "img" / f"g{i}.png", img)
        else:
            _png(root / "test" / "test" / "good" / f"g{i}.png", img)
    for i in range(2):
        img = (rng.random((40, 40)) * 200).astype(np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, 5 + i : 15 + i] = 128 if i else 255  # multi-level masks: binarised with > 0
        if layout == "bmad":
            _png(root / "test" / "Ungood" / "img" / f"u{i}.png", img)
            _png(root / "test" / "Ungood" / "anomaly_mask" / f"u{i}.png", mask)
        else:
            _png(root / "test" / "test" / "Ungood" / f"u{i}.png", img)
            _png(root / "test" / "test_labels" / "Ungood" / f"u{i}.png", mask)


@pytest.mark.parametrize("layout", ["bmad", "reference"])
def test_bmad_reader_both_layouts(tmp_path, layout):
    _bmad_tree(tmp_path, layout)
    ss = read_bmad_test(tmp_path)
    assert ss.labels.tolist() == [0, 0, 0, 1, 1]
    assert [n.split("/")[0] for n in ss.names] == ["good"] * 3 + ["Ungood"] * 2
    assert all(im.dtype == np.float32 and 0 <= im.min() and im.max() <= 1 for im in ss.images)
    assert not any(m.any() for m in ss.masks[:3])
    assert ss.masks[3].sum() == 100 and ss.masks[4].sum() == 100  # 255 and 128 both count


def test_bmad_reader_errors(tmp_path):
    with pytest.raises(InputError, match="not a BMAD dataset"):
        find_test_layout(tmp_path)
    _bmad_tree(tmp_path)
    (tmp_path / "test" / "Ungood" / "anomaly_mask" / "u1.png").unlink()
    with pytest.raises(InputError, match="without a mask"):
        read_bmad_test(tmp_path)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    bb, bank, imgs, gts = write_eval_set(d)
    bank.save(d / "bank")
    return d, bb, bank, imgs, gts


SMALL = Ablations(prompts=("cog-point", "max-point"), gammas=(1.0, 5.0), ks=(1, 2), normalisations=("calibrated", "reference"))


def test_evaluate_rows_and_report(volumes, tmp_path):
    d, bb, bank, imgs, gts = volumes
    res = evaluate(units_from_volumes(imgs, gts, bank), [bank], bb, ablations=SMALL)
    groups = [r["ablation"] for r in res["rows"]]
    assert groups.count("mask") == 3 and groups.count("prompt") == 2 and groups.count("gamma") == 2
    default = res["rows"][0]
    # volumes: the regions prompt with its mask 1 whatever the bank's size (this small one: pixel levels),
    # unless its calibration cannot place the levels (then the per-slice prompt with the paper's mask 3)
    expected = ("regions", 1) if regions_supported(bank) else (default_prompt_for(bb.name), 3)
    assert normal_peak_count(bank) < MIN_NORMAL_PEAKS and (default["prompt"], default["mask"]) == expected
    same = [r for r in res["rows"] if r["ablation"] == "mask" and r["value"] == str(expected[1])][0]
    assert default["slice_dice"] == same["slice_dice"]  # the same decode pass, the same number
    assert {r["value"]: r["mask"] for r in res["rows"] if r["ablation"] == "prompt"} == {"cog-point": 3, "max-point": 3}
    assert len(default["volume_dice_per_subject"]) == 2
    assert res["data"] == {"units": ["t0", "t1"], "slices": 12, "anomalous_slices": 4, "volumes": 2}
    det = res["detection"][0]
    assert 0.0 <= det["p_auroc"] <= 1.0 and 0.0 <= det["image_auroc"] <= 1.0
    paths = write_report(res, tmp_path / "out")
    assert set(paths) >= {"csv", "markdown", "json", "gamma_sweep", "ablations"}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]["ablation"] == "default"
    assert (tmp_path / "out" / "results.md").read_text().count("| gamma |") == 2
    cmp = res["default_vs_baseline"]  # the paired comparison uses the same numbers as the tables
    assert cmp["mean_a"] == pytest.approx(default["slice_dice"]) and cmp["n"] == 4 and cmp["groups"] == 2
    assert cmp["mean_b"] == pytest.approx(det["baseline_threshold_0.5"]["slice_dice"])
    assert cmp["ci95"][0] <= cmp["difference"] <= cmp["ci95"][1]
    assert "Default vs the 0.5-threshold baseline" in (tmp_path / "out" / "results.md").read_text()
    per = cmp["per_subject"]
    assert [s["subject"] for s in per] == ["t0", "t1"] and sum(s["anomalous_slices"] for s in per) == 4
    w = [s["anomalous_slices"] for s in per]
    assert np.average([s["slice_dice"] for s in per], weights=w) == pytest.approx(cmp["mean_a"])
    v = cmp["volume"]  # volume Dice, subject by subject, against the baseline's
    assert v["mean_a"] == pytest.approx(default["volume_dice"], abs=1e-4) and v["groups"] == 2  # per-subject values are rounded to 1e-4
    assert v["mean_b"] == pytest.approx(det["baseline_threshold_0.5"]["volume_dice"], abs=1e-4)
    assert "Volume Dice, subject by subject" in (tmp_path / "out" / "results.md").read_text()
    # lesion-wise (BraTS 2023 rule) beside slice and volume Dice: the default's masks, subject by subject
    lw = default["lesionwise"]
    assert lw["cases"] == 2 and [c["subject"] for c in default["lesionwise_per_subject"]] == ["t0", "t1"]
    assert lw["lesionwise_dice"] == pytest.approx(np.mean([c["lesionwise_dice"] for c in default["lesionwise_per_subject"]]))
    assert lw["detected"] + lw["missed"] == lw["gt_lesions"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "### Lesion-wise (BraTS 2023 rule" in md and "| default | t0 |" in md
    assert "lesionwise_dice" in (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert all("lesionwise" not in r for r in res["rows"] if r["ablation"] == "gamma")


def test_evaluate_regions_prompt(volumes):
    """The regions prompt runs in evaluate on the calibrated maps' 3D regions."""
    d, bb, bank, imgs, gts = volumes
    one = Ablations(prompts=("regions",), gammas=(5.0,), ks=(1,), normalisations=("calibrated",), masks=(3,))
    res = evaluate(units_from_volumes(imgs, gts, bank), [bank], bb, base=SegmentSettings(prompt="regions"), ablations=one)
    assert res["default_settings"]["prompt"] == "regions"
    row = res["rows"][0]
    assert 0.0 <= row["slice_dice"] <= 1.0 and len(row["volume_dice_per_subject"]) == 2


def test_slice_decision_never_reads_test_labels(volumes):
    """Replacing the ground truth with nonsense changes Dice, never which slices are kept."""
    d, bb, bank, imgs, gts = volumes
    units = units_from_volumes(imgs, gts, bank)
    res_true = evaluate(units, [bank], bb, ablations=SMALL)
    rng = np.random.default_rng(1)
    for u in units:
        u.gt = rng.random(u.gt.shape) > 0.5
        u.labels = 1 - u.labels
    res_fake = evaluate(units, [bank], bb, ablations=SMALL)
    for a, b in zip(res_true["rows"], res_fake["rows"]):
        assert a["decision_threshold"] == b["decision_threshold"]
        assert a["slices_kept_with_decision"] == b["slices_kept_with_decision"]
    assert res_true["rows"][0]["slice_dice"] != res_fake["rows"][0]["slice_dice"]


def test_units_from_slices_groups_by_size():
    imgs = [np.zeros((8, 8), np.float32), np.ones((8, 10), np.float32) * 0.5, np.zeros((8, 8), np.float32)]
    imgs[0][2:4, 2:4] = 1.0
    masks = [np.zeros(i.shape, bool) for i in imgs]
    units = units_from_slices(imgs, masks, np.array([0, 1, 0]))
    assert sorted(len(u.frames) for u in units) == [1, 2]
    assert [u.foreground.tolist() for u in units if len(u.frames) == 2][0] == [True, False]


def test_evaluate_cli_bad_input(capsys, tmp_path):
    rc = main(["evaluate", "--bank", str(tmp_path / "nobank"), "--images", str(tmp_path / "a.nii.gz"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr()
    assert rc == 2 and "error:" in err.err and err.out == ""


def test_one_search_per_bank_gives_every_k_the_pipeline_scores(volumes):
    """The sweep searches each bank once with the largest k; every k's scores equal the
    pipeline's own (score_volume with that k)."""
    from napari_mias_sam.evaluation.sweep import EvalContext, unit_scores
    from napari_mias_sam.pipeline.segment import score_volume
    from napari_mias_sam.pipeline.settings import SegmentSettings

    d, bb, bank, imgs, gts = volumes
    units = units_from_volumes(imgs, gts, bank)
    for u in units:
        u.embeddings = bb.encode(u.frames)
    calls = []
    search = bank.search
    bank.search = lambda x, k=1, **kw: calls.append(k) or search(x, k, **kw)
    try:
        ctx = EvalContext(units, [bank], bb, SegmentSettings(), k_max=3)
        got = {k: unit_scores(ctx, 0, k) for k in (1, 2, 3)}
    finally:
        del bank.search
    assert calls and set(calls) == {3} and len(calls) == sum(-(-len(u.frames) // 8) for u in units)
    for k, per_unit in got.items():
        for u, s in zip(units, per_unit):
            # equal up to faiss's fp32 rounding (its search kernels differ with k)
            np.testing.assert_allclose(s, score_volume(u.embeddings, bank, k=k)[0], rtol=1e-4, atol=1e-4)
