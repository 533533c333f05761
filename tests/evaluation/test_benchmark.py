"""``mias-sam benchmark``: the report's structure, labels and arithmetic, on a tiny volume with a
fake backbone (the real encoder's speed is measured by the benchmark itself, never by tests), and
the build-bank memory estimate / option errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fakes import FakeBackbone
from core_fixtures import write_nifti
from napari_mias_sam.evaluation import benchmark as bm
from napari_mias_sam.evaluation.bank_options import bank_accuracy
from napari_mias_sam.cli.commands import main
from napari_mias_sam.core.machine import ram_bytes


@pytest.fixture
def fake_backbone(monkeypatch):
    bb = FakeBackbone()
    import napari_mias_sam.backbones as backbones

    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: bb)
    return bb


def test_synthetic_volume_has_anatomy_and_empty_ends():
    v = bm.synthetic_volume((48, 48, 20))
    assert v.shape == (48, 48, 20) and v.dtype == np.float32 and v.min() >= 0
    per_slice = (v > 0).reshape(-1, 20).mean(axis=0)
    assert per_slice[0] == 0 and per_slice[-1] == 0 and per_slice[10] > 0.3


def test_quick_benchmark_report(fake_backbone):
    rep = bm.run_benchmark(device="cpu", sizes=(3_000, 9_000), quick=True)
    st = rep["stages"]
    for name in ("load", "preprocess", "encode", "features", "map", "prompt", "decode_per_slice", "write"):
        assert st[name]["seconds"] >= 0 and st[name]["peak_rss_mb"] > 0
    n_fg = rep["slices"]["with_anatomy"]
    assert 0 < n_fg <= rep["slices"]["total"] == 12
    enc = st["encode"]
    assert enc["slices"] == 2 and enc["volume_is"] == "extrapolated from 2 slices"
    assert enc["volume_s"] == pytest.approx(enc["per_slice_s"] * n_fg, abs=2e-3)
    assert [k["bank_patches"] for k in rep["knn"]] == [3_000, 9_000]
    for k in rep["knn"]:
        assert k["query_slices"] == 1 and k["status"] == "extrapolated from 1 query slices"
        assert k["volume_s"] == pytest.approx(k["per_slice_s"] * n_fg, abs=2e-3)
        assert k["memory"]["index_bytes"] == k["bank_patches"] * 1024 * 4
    assert st["live_update"]["repeats"] == 5 and st["live_update"]["median_s"] > 0
    assert [t["bank_patches"] for t in rep["totals"]] == [3_000, 9_000]
    assert all(t["is"] == "includes extrapolated stages" for t in rep["totals"])
    m = rep["machine"]
    assert m["date_utc"] and m["cpu_count"] and "torch" in m and "faiss" in m
    text = bm.format_report(rep)
    assert "QUICK" in text and "kNN" in text and "whole volume end to end" in text and m["date_utc"] in text


def test_cpu_banks_over_the_memory_budget_are_extrapolated_not_built(fake_backbone):
    _, avail = ram_bytes()
    if not avail:
        pytest.skip("available memory unknown on this OS")
    budget = 20e6  # a 3,000 x 1,024 fp32 bank (12 MB) fits, a 9,000 one (37 MB) does not
    rep = bm.run_benchmark(device="cpu", sizes=(3_000, 9_000), quick=True, memory_fraction=budget / avail)
    small, big = rep["knn"]
    assert small["status"] == "extrapolated from 1 query slices" and "build_s" in small
    assert big["status"].startswith("extrapolated linearly from the 3,000-patch bank") and "build_s" not in big
    assert big["per_slice_s"] == pytest.approx(3 * small["per_slice_s"], rel=1e-3, abs=1e-4)
    rep = bm.run_benchmark(device="cpu", sizes=(2_000,), quick=True, memory_fraction=1e-12)
    assert rep["knn"][0]["status"].startswith("skipped")  # nothing measured to scale from
    assert rep["totals"] == []


def test_cli_benchmark_quick_json(fake_backbone, capsys):
    rc = main(["benchmark", "--quick", "--json", "--device", "cpu", "--sizes", "2k,5k"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["quick"] is True and [k["bank_patches"] for k in rep["knn"]] == [2_000, 5_000]


@pytest.mark.parametrize("bad, msg", [(["--sizes", "10q"], "--sizes"), (["--sizes", "0"], "positive"),
                                      (["--encode-slices", "0"], "--encode-slices")])
def test_cli_benchmark_bad_options(bad, msg, capsys):
    assert main(["benchmark", "--quick", *bad]) == 2
    assert msg in capsys.readouterr().err


def test_build_bank_prints_memory_estimate_and_checks_coreset(tmp_path, fake_backbone, capsys):
    vol = np.zeros((32, 32, 4), np.float32)
    vol[8:24, 8:24] = np.linspace(1, 2, 4)
    src = write_nifti(tmp_path / "n.nii.gz", vol, np.eye(4))
    assert main(["build-bank", str(src), "--out", str(tmp_path / "b1"), "--coreset", "1.5"]) == 2
    assert "--coreset must be a fraction" in capsys.readouterr().err
    assert not (tmp_path / "b1").exists()
    assert main(["build-bank", str(src), "--out", str(tmp_path / "b2"), "--coreset", "0.5", "--index", "flat-sq8",
                 "--layout", "mean256"]) == 0
    err = capsys.readouterr().err
    assert "memory estimate: up to 4 slices -> 2,048 patches x 256-d, index flat-sq8: " in err
    from napari_mias_sam.bank import load_bank

    b = load_bank(tmp_path / "b2")
    assert b.manifest["coreset"]["ratio"] == 0.5 and b.manifest["index"]["type"] == "flat-sq8"
    assert b.ntotal <= 2_048


def test_the_gpu_knn_code_path_runs_on_the_cpu(fake_backbone):
    """The torch search stage (what a GPU runs) on the CPU: every slice's queries, measured."""
    rep = bm.run_benchmark(device="cpu", sizes=(3_000,), quick=True, knn_backend="torch")
    (k,) = rep["knn"]
    assert k["index"].startswith("torch") and k["status"] == "measured" and k["exact_fp32_rerank"]
    assert k["query_slices"] == rep["slices"]["with_anatomy"] and k["volume_s"] == k["search_s"]
    with pytest.raises(ValueError, match="knn_backend"):
        bm.run_benchmark(device="cpu", sizes=(3_000,), quick=True, knn_backend="annoy")


def test_accuracy_files_reads_both_layouts(tmp_path):
    """benchmark --accuracy: the benchmark's train/test layout and the sample's, paired by name."""
    from napari_mias_sam.evaluation.bank_options import accuracy_files
    from napari_mias_sam.core.errors import InputError

    bench = tmp_path / "bench"
    for rel in ("train/normal_01.nii.gz", "train/normal_02.nii.gz", "test/images/case_01.nii.gz", "test/labels/case_01.nii.gz"):
        (bench / rel).parent.mkdir(parents=True, exist_ok=True)
        (bench / rel).write_bytes(b"")
    normals, cases = accuracy_files(bench)
    assert [p.name for p in normals] == ["normal_01.nii.gz", "normal_02.nii.gz"]
    assert cases == [(bench / "test/images/case_01.nii.gz", bench / "test/labels/case_01.nii.gz")]
    (bench / "test/images/case_02.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="without a ground truth"):
        accuracy_files(bench)
    sample = tmp_path / "sample"
    sample.mkdir()
    for name in ("normal_01.nii.gz", "case_01.nii.gz", "case_01_seg.nii.gz", "case_02.nii.gz"):
        (sample / name).write_bytes(b"")
    normals, cases = accuracy_files(sample)
    assert [c[0].name for c in cases] == ["case_01.nii.gz"]  # case_02 has no ground truth
    with pytest.raises(InputError, match="needs normal volumes"):
        accuracy_files(tmp_path / "empty")


def test_bank_accuracy_pools_slice_dice_like_the_paper(tmp_path):
    """benchmark --accuracy: the exact row equals a direct run; slice Dice is pooled over every
    anomalous slice of every case; other options are compared with the exact bank."""
    import nibabel as nib

    from core_fixtures import anatomy_volume
    from napari_mias_sam.bank import build_bank
    from napari_mias_sam.evaluation.scoring import gt_metrics
    from napari_mias_sam.data.volumes import load_volume
    from napari_mias_sam.pipeline.segment import segment_volume
    from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
    from napari_mias_sam.core.records import to_dict
    from napari_mias_sam.pipeline.frames import volume_groups

    normals = [write_nifti(tmp_path / f"n{i}.nii.gz", anatomy_volume((48, 48, 3), seed=i) * 300) for i in (1, 2)]
    cases = []
    for i, slices in ((3, [0, 1]), (4, [2])):
        img = anatomy_volume((48, 48, 3), seed=i, blob={"centre": (30, 18), "radius": 6, "value": 1.0, "slices": slices}) * 300
        gt = np.zeros(img.shape, np.uint8)
        yy, xx = np.indices(img.shape[:2])
        gt[..., slices] = (((yy - 30) ** 2 + (xx - 18) ** 2) <= 36)[..., None]
        cases.append((write_nifti(tmp_path / f"c{i}.nii.gz", img), write_nifti(tmp_path / f"c{i}_seg.nii.gz", gt)))
    fake = FakeBackbone()
    opts = ({"index_type": "flat"}, {"index_type": "flat-sq8"}, {"index_type": "flat", "coreset_ratio": 0.5})
    rep = bank_accuracy(normals, cases, options=opts, backbone=fake, layout="mean256")
    exact, sq8, core = rep["results"]
    assert exact["dice_points_vs_exact"] == 0 and exact["patches"] == 6 * 1024 and core["patches"] <= 3 * 1024 + 2
    prep = PREPROCESS_PRESETS["mri"]
    bank = build_bank(volume_groups(normals, prep), fake, layout="mean256", preprocessing=to_dict(prep))
    per_slice = []
    for img, gt in cases:
        m = gt_metrics(segment_volume(load_volume(img), bank, fake), np.asarray(nib.load(gt).dataobj) > 0)
        per_slice += list(m["per_slice_dice"].values())
    assert len(per_slice) == 3 and exact["mean_slice_dice"] == pytest.approx(float(np.mean(per_slice)))
    for r in (sq8, core):
        assert r["dice_points_vs_exact"] == pytest.approx(100 * (r["mean_slice_dice"] - exact["mean_slice_dice"]), abs=0.01)
        assert all(0.0 <= c["nn_recall_vs_exact"] <= 1.0 for c in r["cases"].values())
