"""BraTS and LiTS from the command line: build-bank from a dataset root, info's sources, segment a
case folder (its seg paired, lesion labels reported), evaluate --dataset, and the bad inputs
(one line, exit 2, nothing written). A fast fake backbone stands in for LiteMedSAM (the real one
runs in test_dataset_e2e.py)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import napari_mias_sam.backbones as backbones_mod
from core_fixtures import snapshot
from dataset_fixtures import brats2021_root, brats2023_root, brats_case, lits_root, write
from napari_mias_sam.cli.commands import main
from test_cli import fake_loader, one_line_error


@pytest.fixture(autouse=True)
def _fake(tmp_path, monkeypatch):
    monkeypatch.setenv("MIAS_SAM_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("dscli")
    roots = {"b21": brats2021_root(base / "b21"), "b23": brats2023_root(base / "b23"), "lits": lits_root(base / "lits")}
    (base / "b21-test.txt").write_text("BraTS2021_00001\n")
    (base / "lits-test.txt").write_text("volume-2\nvolume-3\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIAS_SAM_CACHE", str(base / "user-cache"))
        mp.setattr(backbones_mod, "load_backbone", fake_loader())
        assert main(["build-bank", str(roots["b21"]), "--modality", "flair", "--margin", "2", "--exclude-subjects",
                     str(base / "b21-test.txt"), "--layout", "mean256", "--out", str(base / "bank-b21")]) == 0
        assert main(["build-bank", str(roots["lits"]), "--roi", "liver", "--exclude-subjects", str(base / "lits-test.txt"),
                     "--layout", "mean256", "--out", str(base / "bank-lits")]) == 0
    return {"base": base, **roots}


def test_info_lists_sources(world, capsys):
    capsys.readouterr()
    assert main(["info", str(world["base"] / "bank-b21"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert [s["path"] for s in m["sources"]] == [str(world["b21"] / s / f"{s}_flair.nii.gz") for s in ("BraTS2021_00002", "BraTS2021_00003")]
    assert m["sources"][1]["slices"] == list(range(14))
    seg = np.asarray(nib.load(str(world["b21"] / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz")).dataobj)
    lesion = np.flatnonzero(seg.any(axis=(0, 1)))
    assert m["sources"][0]["slices"] and all(min(abs(k - lesion)) > 2 for k in m["sources"][0]["slices"])
    assert m["dataset"]["modality"] == "flair" and m["dataset"]["subjects"] == ["BraTS2021_00002", "BraTS2021_00003"]
    assert main(["info", str(world["base"] / "bank-b21")]) == 0
    assert "BraTS 2021" in capsys.readouterr().out


def test_segment_a_case_folder(world, tmp_path, capsys):
    case = world["b21"] / "BraTS2021_00001"
    before = snapshot(case)
    capsys.readouterr()
    rc = main(["segment", str(case), "--bank", str(world["base"] / "bank-b21"), "--out", str(tmp_path / "out"), "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rep = json.loads(cap.out)
    assert rep["volume"] == str(case / "BraTS2021_00001_flair.nii.gz")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "BraTS2021_00001_flair_anomaly.nii.gz", "BraTS2021_00001_flair_lesions.csv", "BraTS2021_00001_flair_lesions.nii.gz",
        "BraTS2021_00001_flair_mask.nii.gz", "BraTS2021_00001_flair_points.csv"]
    assert rep["ground_truth"] == str(case / "BraTS2021_00001_seg.nii.gz")
    lab = rep["lesion_labels"]
    assert lab["rule"] == "any non-zero label" and lab["counted"] == [1, 2, 4] and "BraTS 2021" in lab["source"]
    # --lesion-labels: the enhancing tumour only
    rc = main(["segment", str(case), "--bank", str(world["base"] / "bank-b21"), "--out", str(tmp_path / "out4"),
               "--lesion-labels", "4", "--json"])
    rep4 = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep4["lesion_labels"]["counted"] == [4] and rep4["lesion_labels"]["source"] == "--lesion-labels 4"
    pred = np.asarray(nib.load(rep4["outputs"]["mask"]).dataobj) > 0
    gt = np.asarray(nib.load(str(case / "BraTS2021_00001_seg.nii.gz")).dataobj) == 4
    assert rep4["metrics"]["volume_dice"] == pytest.approx(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    # another modality of the same case (the bank's is flair): named after its file
    rc = main(["segment", str(case), "--bank", str(world["base"] / "bank-b21"), "--out", str(tmp_path / "out"), "--modality", "t1ce"])
    assert rc == 0 and (tmp_path / "out" / "BraTS2021_00001_t1ce_mask.nii.gz").is_file()
    assert "lesion = any non-zero label" in capsys.readouterr().out
    assert snapshot(case) == before


def test_lits_dice_counts_the_tumour_not_the_liver(world, tmp_path, capsys):
    """volume-3: the liver label (1) covers the whole organ, the prediction included; the tumour
    (2) is far from the prediction. Scored as LiTS says (lesion = 2) its Dice is low; the old
    '> 0' binarisation would score the liver."""
    vol = world["lits"] / "volume-3.nii"
    capsys.readouterr()
    rc = main(["segment", str(vol), "--bank", str(world["base"] / "bank-lits"), "--out", str(tmp_path / "o"), "--json",
               "--prompt", "cog-point"])  # the fake decoder's point masks are small squares around the prompt
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rep = json.loads(cap.out)
    assert rep["ground_truth"] == str(world["lits"] / "segmentation-3.nii")
    assert rep["lesion_labels"]["labels"] == [2] and rep["lesion_labels"]["counted"] == [2]
    assert rep["roi"].startswith("liver")
    pred = np.asarray(nib.load(rep["outputs"]["mask"]).dataobj) > 0
    seg = np.asarray(nib.load(str(world["lits"] / "segmentation-3.nii")).dataobj)
    assert pred.any() and (seg[pred] >= 1).mean() > 0.95  # the prediction lies in the liver
    assert (seg[pred] == 2).mean() < 0.05  # and (almost) not on the tumour
    assert rep["metrics"]["volume_dice"] < 0.1 and rep["metrics"]["slice_dice"] < 0.1
    rc = main(["segment", str(vol), "--bank", str(world["base"] / "bank-lits"), "--out", str(tmp_path / "o2"), "--json",
               "--lesion-labels", "1,2", "--prompt", "cog-point"])
    liver = json.loads(capsys.readouterr().out)
    assert liver["metrics"]["volume_dice"] > 2 * rep["metrics"]["volume_dice"]


def test_evaluate_a_dataset(world, tmp_path, capsys):
    out = tmp_path / "eval"
    test = world["base"] / "b21-test.txt"
    capsys.readouterr()
    rc = main(["evaluate", "--bank", str(world["base"] / "bank-b21"), "--dataset", str(world["b21"]), "--subjects", str(test),
               "--out", str(out), "--json", "--gammas", "5", "--ks", "1", "--prompts", "cog-box"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(cap.out)
    ds = res["data"]["dataset"]
    assert ds["subjects"] == ["BraTS2021_00001"] and ds["modality"] == "flair" and ds["lesion_labels"]["counted"] == [1, 2, 4]
    assert res["data"]["units"] == ["BraTS2021_00001"] and (out / "results.json").is_file()
    assert "1 test subjects; lesion = any non-zero label" in (out / "results.md").read_text()
    # LiTS: the liver ROI of the bank applies to the test volumes too; lesion = 2
    rc = main(["evaluate", "--bank", str(world["base"] / "bank-lits"), "--dataset", str(world["lits"]), "--subjects",
               str(world["base"] / "lits-test.txt"), "--out", str(tmp_path / "el"), "--json", "--gammas", "5", "--ks", "1",
               "--prompts", "cog-box"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["data"]["dataset"]["roi"] == "liver" and res["data"]["dataset"]["lesion_labels"]["counted"] == [2]


def test_brats2023_names(world, tmp_path, capsys):
    bank = tmp_path / "bank23"
    assert main(["build-bank", str(world["b23"]), "--modality", "t2f", "--layout", "mean256", "--out", str(bank),
                 "--subjects", str(_write(tmp_path / "s.txt", "BraTS-GLI-00002-000"))]) == 0
    capsys.readouterr()
    rc = main(["segment", str(world["b23"] / "BraTS-GLI-00001-000"), "--bank", str(bank), "--out", str(tmp_path / "o"), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["volume"].endswith("BraTS-GLI-00001-000-t2f.nii.gz") and rep["lesion_labels"]["counted"] == [1, 2, 3]


def _write(path, text):
    path.write_text(text + "\n")
    return path


# --------------------------------------------------------------------------- bad inputs
def test_bad_dataset_inputs(world, tmp_path, capsys):
    base, bank = world["base"], str(world["base"] / "bank-b21")
    out = tmp_path / "out"

    def refused(args, command, message):
        capsys.readouterr()
        assert main(args) == 2
        line = one_line_error(capsys, command)
        assert message in line, line
        assert not out.exists()

    # a case folder without the asked modality
    refused(["segment", str(world["lits"]), "--bank", bank, "--out", str(out)], "segment", "holds 4 cases")
    refused(["build-bank", str(world["lits"]), "--modality", "flair", "--out", str(out)], "build-bank", "has no flair image")
    refused(["segment", str(world["b21"] / "BraTS2021_00001"), "--bank", bank, "--out", str(out), "--modality", "ct"],
            "segment", "has no ct image")
    # two seg files
    two = tmp_path / "two" / "BraTS2021_00007"
    shutil.copytree(world["b21"] / "BraTS2021_00001", two.parent / "BraTS2021_00001")
    (two.parent / "BraTS2021_00001").rename(two)
    for f in two.iterdir():
        f.rename(two / f.name.replace("00001", "00007"))
    (two / "BraTS2021_00007_seg.nii").write_bytes(b"x")
    refused(["segment", str(two), "--bank", bank, "--out", str(out)], "segment", "two segmentation files")
    refused(["build-bank", str(two.parent), "--out", str(out)], "build-bank", "two segmentation files")
    (two / "BraTS2021_00007_seg.nii").unlink()
    # a seg on another grid
    seg = two / "BraTS2021_00007_seg.nii.gz"
    write(seg, np.zeros((155, 192, 15), np.uint8), np.eye(4))
    refused(["segment", str(two), "--bank", bank, "--out", str(out)], "segment", "_seg.nii.gz: segmentation of shape")
    refused(["build-bank", str(two), "--out", str(out)], "build-bank", "_seg.nii.gz: segmentation of shape")
    # modalities of different shapes (the t2 against the flair of the case, and its seg)
    shutil.copy(world["b21"] / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz", seg)
    write(two / "BraTS2021_00007_t2.nii.gz", np.ones((155, 192, 12), np.int16), np.eye(4))
    refused(["build-bank", str(two), "--modality", "t2", "--out", str(out)], "build-bank", "_t2.nii.gz: image of shape (155, 192, 12)")
    # an empty root
    (tmp_path / "empty").mkdir()
    refused(["evaluate", "--bank", bank, "--dataset", str(tmp_path / "empty"), "--out", str(out)], "evaluate", "holds no dataset cases")
    # a subject in both the bank and the test list
    refused(["evaluate", "--bank", bank, "--dataset", str(world["b21"]), "--out", str(out)], "evaluate",
            "BraTS2021_00002 is both in the bank")
    # --subjects and --exclude-subjects naming the same subject
    refused(["build-bank", str(world["b21"]), "--subjects", str(base / "b21-test.txt"), "--exclude-subjects",
             str(base / "b21-test.txt"), "--out", str(out)], "build-bank", "is in both")
    # dataset options on plain files
    refused(["build-bank", str(world["lits"] / "volume-0.nii"), "--margin", "3", "--out", str(out)], "build-bank",
            "--margin applies to a labelled dataset")
    refused(["segment", str(world["b21"] / "BraTS2021_00001"), "--bank", bank, "--out", str(out), "--lesion-labels", "0,1"],
            "segment", "0 is the background")
