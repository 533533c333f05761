"""The development-split prompt study (benchmarks/prompt_study.py): its baseline and default rows
are the numbers ``mias-sam evaluate`` gives, and its label-reading oracle bounds what it should."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from eval_fixtures import write_eval_set
from napari_mias_sam.evaluation.sweep import Ablations, evaluate, units_from_volumes
from napari_mias_sam.pipeline.settings import SegmentSettings

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "prompt_study.py"


def _load_study():
    spec = importlib.util.spec_from_file_location("prompt_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_eval_set(tmp_path_factory.mktemp("study"))


def test_study_rows_match_evaluate_and_oracles_bound(data):
    bb, bank, imgs, gts = data
    mod = _load_study()
    res = mod.study(units_from_volumes(imgs, gts, bank), bank, bb)
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == [v[0] for v in mod.VARIANTS] and res["anomalous_slices"] == 4 and res["subjects"] == 2
    ev = evaluate(units_from_volumes(imgs, gts, bank), [bank], bb, base=SegmentSettings(prompt="cog-box"),
                  ablations=Ablations(prompts=("threshold-box",), gammas=(), ks=(1,), normalisations=(), masks=()))
    default = ev["rows"][0]
    assert rows["cog-box 2.0"]["slice_dice"] == pytest.approx(default["slice_dice"], abs=1e-6)
    assert rows["baseline"]["slice_dice"] == pytest.approx(ev["detection"][0]["baseline_threshold_0.5"]["slice_dice"], abs=1e-6)
    tbox = [r for r in ev["rows"] if r["ablation"] == "prompt"][0]
    assert rows["threshold-box"]["slice_dice"] == pytest.approx(tbox["slice_dice"], abs=1e-6)
    per = res["per_slice"]
    assert all(o >= d - 1e-12 for o, d in zip(per["oracle: best mask"], per["cog-box 2.0"]))
    assert rows["oracle: GT box"]["reads_labels"] and not rows["cog-box 2.0"]["reads_labels"]
    # the fake decoder's mask 3 is a radius-10 disc at the box centre; the GT box centres it on the
    # lesion (radius 5 grid pixels, about 23 frame pixels): Dice near 2 * 10^2 / (10^2 + 23^2) = 0.32,
    # the best a disc of that size can do, so no prompt from the map beats it
    assert rows["oracle: GT box"]["slice_dice"] == pytest.approx(0.32, abs=0.03)
    assert rows["oracle: GT box"]["slice_dice"] >= rows["cog-box 2.0"]["slice_dice"]
    diff = rows["cog-box 2.0"]
    assert diff["difference"] == pytest.approx(diff["slice_dice"] - rows["baseline"]["slice_dice"])
    assert diff["ci95"][0] <= diff["difference"] <= diff["ci95"][1]
    table = mod.markdown(res)
    assert table.count("\n| ") == len(mod.VARIANTS) + 1 and "oracle: GT box" in table


def test_study_helpers():
    mod = _load_study()
    m = np.zeros((8, 9), bool)
    assert mod.bounding_box(m) is None
    m[2:5, 3:7] = True
    assert mod.bounding_box(m) == (3.0, 2.0, 6.0, 4.0)
    maps = np.zeros((3, 4, 4), np.float32)
    maps[1] = 4.0
    z = mod.z_smoothed(maps, np.array([True, True, False]))
    assert z[0, 0, 0] == pytest.approx(1.0) and z[1, 0, 0] == pytest.approx(2.0) and z[2].max() == 0.0


def test_study_boxes():
    mod = _load_study()
    from napari_mias_sam.method.prompts import cog_box

    rng = np.random.default_rng(3)
    m = rng.random((64, 64)).astype(np.float32)
    m[20:30, 35:50] += 3.0
    assert mod.moment_box(m) == pytest.approx(cog_box(m, 5.0))  # the default box, written again
    wide, local = mod.moment_box(m, spread_gamma=1.0), mod.moment_box(m, window=1.5)
    assert wide[2] - wide[0] > local[2] - local[0]  # flatter weights spread wider; the window narrows
    one = np.zeros((16, 16), np.float32)
    one[5, 9] = 1.0
    assert mod.quantile_box(one) == (9.0, 5.0, 9.0, 5.0)
    assert mod.moment_box(np.zeros((8, 8))) is None and mod.quantile_box(np.zeros((8, 8))) is None


def test_study_command_refuses_bad_input(tmp_path, capsys):
    mod = _load_study()
    img = tmp_path / "a.nii.gz"
    assert mod.main(["--bank", str(tmp_path / "nobank"), "--images", str(img), "--gts", str(img)]) == 2
    assert "not a memory bank folder" in capsys.readouterr().err
    out = tmp_path / "study.json"
    out.write_text("mine")
    with pytest.raises(SystemExit):
        mod.main(["--bank", str(tmp_path), "--images", str(img), "--gts", str(img), "--json", str(out)])
    assert out.read_text() == "mine" and "exists" in capsys.readouterr().err
