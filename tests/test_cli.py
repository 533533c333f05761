"""The command line: help texts, one-line errors with exit status 2 on bad input (inputs left
byte-identical, no partial outputs), and build-bank / segment / info runs with a fast fake
backbone standing in for LiteMedSAM (the real one runs in test_e2e.py)."""

from __future__ import annotations

import argparse
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import napari_mias_sam.backbones as backbones_mod
from fakes import FakeBackbone
from core_fixtures import anatomy_volume, disk, sha256, snapshot, write_nifti
from napari_mias_sam.cli.commands import build_parser, main

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def fake_loader(sha: str = "fake-weights-0001"):
    def load(name="litemedsam", checkpoint=None, device=None, **kwargs):
        return FakeBackbone(name=name, sha=sha)

    return load


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIAS_SAM_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A bank made by 'mias-sam build-bank' (fake backbone named litemedsam) and test files."""
    root = tmp_path_factory.mktemp("cli")
    normals = root / "normals"
    for i in (1, 2):
        write_nifti(normals / f"n{i}.nii.gz", anatomy_volume((48, 48, 3), seed=i) * 200, AFFINE)
    gt = np.zeros((48, 48, 3), np.uint8)
    gt[..., 1] = disk((48, 48), (30, 20), 5)
    data = anatomy_volume((48, 48, 3), seed=5) * 200
    data[..., 1] = np.where(gt[..., 1] > 0, 400.0, data[..., 1])
    cases = root / "cases"
    write_nifti(cases / "case.nii.gz", data, AFFINE)
    write_nifti(cases / "case_seg.nii.gz", gt, AFFINE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIAS_SAM_CACHE", str(root / "user-cache"))
        mp.setattr(backbones_mod, "load_backbone", fake_loader())
        rc = main(["build-bank", str(normals), "--out", str(root / "bank"), "--layout", "mean256", "--json"])
    assert rc == 0
    return {"root": root, "normals": normals, "cases": cases, "bank": root / "bank", "gt": gt}


def subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", subcommands())
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"mias-sam {command}" in out


def test_top_level_help_and_version(capsys):
    assert {"build-bank", "segment", "demo", "info"} <= set(subcommands())
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "build-bank" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "mias-sam" in capsys.readouterr().out
    assert main([]) == 2


# --------------------------------------------------------------------------- runs
def test_build_bank_json_and_info(world, capsys):
    rc = main(["info", str(world["bank"]), "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["backbone"]["name"] == "litemedsam" and m["backbone"]["weights_sha256"] == "fake-weights-0001"
    assert m["patch_layout"] == "mean256" and m["counts"]["slices"] == 6 and m["index"]["ntotal"] == 6 * 1024
    assert m["calibration"]["method"] == "leave-one-source-out"
    assert m["preprocessing"]["mode"] == "mri" and m["slice_axis"] == "axial"
    assert set(m["calibration"]["per_k"]["1"]) == {"low", "high"}
    assert main(["info", str(world["bank"])]) == 0
    assert "6,144 patches from 6 slices of 2 sources" in capsys.readouterr().out


def test_segment_json_with_gt(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader())
    case, seg = world["cases"] / "case.nii.gz", world["cases"] / "case_seg.nii.gz"
    before = snapshot(world["cases"])
    out = tmp_path / "out"
    rc = main(["segment", str(case), "--bank", str(world["bank"]), "--out", str(out), "--gt", str(seg), "--json",
               "--prompt", "cog-point", "--mask", "2"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rep = json.loads(cap.out)
    assert set(rep["outputs"]) == {"mask", "anomaly", "points", "lesions", "lesions_table"}
    assert rep["settings"]["prompt"] == "cog-point" and rep["settings"]["mask_index"] == 2
    pred = np.asarray(nib.load(rep["outputs"]["mask"]).dataobj) > 0
    gt = world["gt"] > 0
    inter = np.logical_and(pred, gt).sum()
    assert rep["metrics"]["volume_dice"] == pytest.approx(2 * inter / (pred.sum() + gt.sum()))
    s = 1  # the only lesion slice
    ds = 2 * np.logical_and(pred[..., s], gt[..., s]).sum() / (pred[..., s].sum() + gt[..., s].sum())
    assert rep["metrics"]["slice_dice"] == pytest.approx(ds)
    assert rep["metrics"]["lesion_slices"] == 1
    # lesions: the mask's 26-connected components of >= 10 voxels, ids from the largest, with the input's geometry
    lab_img = nib.load(rep["outputs"]["lesions"])
    lab = np.asarray(lab_img.dataobj)
    np.testing.assert_allclose(lab_img.affine, AFFINE)
    from scipy import ndimage

    comps, n = ndimage.label(pred, structure=np.ones((3, 3, 3)))
    sizes = sorted((int((comps == i).sum()) for i in range(1, n + 1)), reverse=True)
    assert [int((lab == i).sum()) for i in range(1, lab.max() + 1)] == [v for v in sizes if v >= 10]
    assert set(np.unique(lab[~pred])) == {0}
    with open(rep["outputs"]["lesions_table"], newline="") as fh:
        table = list(__import__("csv").DictReader(fh))
    assert [int(r["id"]) for r in table] == list(range(1, lab.max() + 1))
    assert all(float(r["volume_ml"]) == pytest.approx(int(r["voxels"]) * 2 / 1000) for r in table)  # 1 x 1 x 2 mm voxels
    lw = rep["metrics"]["lesionwise"]
    assert lw["gt_lesions"] == 1 and lw["detected"] + lw["missed"] == 1 and lw["pred_lesions"] == len(table)
    assert [r["match"] for r in table].count("false positive") == lw["false_positives"]
    assert 0.0 <= lw["lesionwise_dice"] <= 1.0
    assert snapshot(world["cases"]) == before
    # a second run into the same folder without --overwrite is refused, with --overwrite it works
    rc = main(["segment", str(case), "--bank", str(world["bank"]), "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 2 and "already exists" in cap.err and cap.out == ""
    assert main(["segment", str(case), "--bank", str(world["bank"]), "--out", str(out), "--overwrite"]) == 0


# --------------------------------------------------------------------------- bad inputs
def one_line_error(capsys, command: str) -> str:
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    # Informational lines (e.g. build-bank's memory estimate) may come first; the reason is one
    # line, the last, and the only one that says "error".
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], cap.err
    assert lines[-1].startswith(f"mias-sam {command}: error: ")
    return lines[-1]


def _bad_volume(kind: str, folder):
    p = folder / "bad.nii.gz"
    if kind == "truncated":
        good = write_nifti(folder / "full.nii.gz", np.random.default_rng(0).normal(size=(48, 48, 3)).astype(np.float32))
        p.write_bytes(good.read_bytes()[:300])
    elif kind == "corrupt":
        p.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "2d":
        write_nifti(p, np.ones((48, 48), np.float32))
    elif kind == "4d":
        write_nifti(p, np.ones((48, 48, 3, 2), np.float32))
    elif kind == "nan":
        d = anatomy_volume((48, 48, 3), seed=1)
        d[3, 3, 1] = np.nan
        write_nifti(p, d, AFFINE)
    elif kind == "constant":
        write_nifti(p, np.full((48, 48, 3), 3.0, np.float32), AFFINE)
    return p


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "cannot read this NIfTI file"),
        ("corrupt", "cannot read this NIfTI file"),
        ("2d", "has 2 dimensions"),
        ("4d", "has 4 dimensions"),
        ("nan", "NaN or infinite"),
        ("constant", "every voxel has the same value"),
    ],
)
def test_segment_bad_volume(world, tmp_path, monkeypatch, capsys, kind, message):
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader())
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = _bad_volume(kind, inputs)
    before, bank_before = snapshot(inputs), snapshot(world["bank"])
    out = tmp_path / "out"
    rc = main(["segment", str(bad), "--bank", str(world["bank"]), "--out", str(out), "--json"])
    assert rc == 2
    line = one_line_error(capsys, "segment")
    assert message in line and ("bad.nii.gz" in line or kind == "constant")
    assert snapshot(inputs) == before and snapshot(world["bank"]) == bank_before
    assert snapshot(out) == {}  # no partial outputs


def test_segment_batch_with_one_bad_volume_writes_nothing(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader())
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = _bad_volume("nan", inputs)
    good = world["cases"] / "case.nii.gz"
    before = snapshot(inputs)
    out = tmp_path / "out"
    rc = main(["segment", str(good), str(bad), "--bank", str(world["bank"]), "--out", str(out)])
    assert rc == 2 and "NaN or infinite" in one_line_error(capsys, "segment")
    assert snapshot(out) == {}  # not even the good volume's outputs: the batch stops before it starts
    assert snapshot(inputs) == before


@pytest.mark.parametrize("kind", ["shape", "affine"])
def test_segment_gt_on_another_grid(world, tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader())
    case = world["cases"] / "case.nii.gz"
    if kind == "shape":
        gt = write_nifti(tmp_path / "gt.nii.gz", world["gt"][:, :40], AFFINE)
    else:
        gt = write_nifti(tmp_path / "gt.nii.gz", world["gt"], np.diag([1.0, 1.0, 2.5, 1.0]))
    before = {"case": sha256(case), "gt": sha256(gt)}
    rc = main(["segment", str(case), "--bank", str(world["bank"]), "--out", str(tmp_path / "out"), "--gt", str(gt)])
    assert rc == 2
    line = one_line_error(capsys, "segment")
    assert "gt.nii.gz" in line and ("shape (48, 40, 3) differs" in line if kind == "shape" else "affine differs" in line)
    assert {"case": sha256(case), "gt": sha256(gt)} == before
    assert snapshot(tmp_path / "out") == {}


def test_segment_with_a_bank_of_other_weights(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader(sha="ffffffffffff-other"))
    rc = main(["segment", str(world["cases"] / "case.nii.gz"), "--bank", str(world["bank"]), "--out", str(tmp_path / "out")])
    assert rc == 2
    line = one_line_error(capsys, "segment")
    assert "fake-weights" in line and "ffffffffffff" in line and "rebuild the bank" in line
    assert snapshot(tmp_path / "out") == {}


def test_segment_with_a_missing_sam_checkpoint(world, tmp_path, capsys):
    bank = tmp_path / "sam-bank"  # a bank that records SAM ViT-B (its backbone is what the run loads)
    shutil.copytree(world["bank"], bank)
    manifest = json.loads((bank / "manifest.json").read_text())
    manifest["backbone"]["name"] = "sam-vit_b"
    (bank / "manifest.json").write_text(json.dumps(manifest))
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    rc = main(["segment", str(world["cases"] / "case.nii.gz"), "--bank", str(bank), "--out", str(tmp_path / "out"),
               "--checkpoint", str(missing)])
    assert rc == 2
    line = one_line_error(capsys, "segment")
    assert "weights file not found" in line and str(missing) in line
    assert snapshot(tmp_path / "out") == {}


def test_segment_with_another_backbone_than_the_banks(world, tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(backbones_mod, "load_backbone", lambda *a, **k: loads.append(a))
    rc = main(["segment", str(world["cases"] / "case.nii.gz"), "--bank", str(world["bank"]), "--out", str(tmp_path / "out"),
               "--backbone", "sam-vit_b", "--checkpoint", str(tmp_path / "sam_vit_b_01ec64.pth")])
    assert rc == 2
    line = one_line_error(capsys, "segment")
    assert "built with litemedsam but the selected backbone is sam-vit_b" in line and "select litemedsam" in line
    assert loads == [] and snapshot(tmp_path / "out") == {}  # refused before any model loads


def test_segment_output_would_overwrite_an_input(world, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    case = write_nifti(folder / "case.nii.gz", anatomy_volume((48, 48, 3), seed=1), AFFINE)
    gt = write_nifti(folder / "case_mask.nii.gz", world["gt"], AFFINE)  # same name as the mask output
    before = snapshot(folder)
    rc = main(["segment", str(case), "--bank", str(world["bank"]), "--out", str(folder), "--gt", str(gt), "--overwrite"])
    assert rc == 2
    assert "would overwrite an input" in one_line_error(capsys, "segment")
    assert snapshot(folder) == before


def test_segment_missing_inputs(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader())
    case = world["cases"] / "case.nii.gz"
    rc = main(["segment", str(case), "--bank", str(tmp_path / "nobank"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "not a memory bank folder" in one_line_error(capsys, "segment")
    rc = main(["segment", str(tmp_path / "nope.nii.gz"), "--bank", str(world["bank"]), "--out", str(tmp_path / "out")])
    assert rc == 2 and "no such file" in one_line_error(capsys, "segment")
    rc = main(["segment", str(case), str(case), "--bank", str(world["bank"]), "--out", str(tmp_path / "out")])
    assert rc == 2 and "share a file name" in one_line_error(capsys, "segment")
    rc = main(["segment", str(case), "--bank", str(world["bank"]), "--out", str(tmp_path / "out"), "--gt", str(case), str(case)])
    assert rc == 2 and "one ground truth per volume" in one_line_error(capsys, "segment")
    rc = main(["segment", str(case), "--bank", str(world["bank"]), "--out", str(tmp_path / "out"), "--batch-size", "0"])
    assert rc == 2 and "--batch-size" in one_line_error(capsys, "segment")
    assert snapshot(tmp_path / "out") == {}


def test_build_bank_refusals(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader())
    normals = world["normals"]
    before, bank_before = snapshot(normals), snapshot(world["bank"])
    rc = main(["build-bank", str(normals), "--out", str(world["bank"])])
    assert rc == 2 and "already exists" in one_line_error(capsys, "build-bank")
    rc = main(["build-bank", str(normals), "--out", str(normals), "--overwrite"])
    assert rc == 2 and "cannot be an input folder" in one_line_error(capsys, "build-bank")
    rc = main(["build-bank", str(tmp_path / "none.nii.gz"), "--out", str(tmp_path / "b")])
    assert rc == 2 and "no such file" in one_line_error(capsys, "build-bank")
    flat = write_nifti(tmp_path / "flat" / "flat.nii.gz", np.zeros((16, 16, 2), np.float32))
    rc = main(["build-bank", str(flat), "--out", str(tmp_path / "b")])
    assert rc == 2 and "same value" in one_line_error(capsys, "build-bank")
    # an existing folder that is not a bank is never replaced, even with --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc = main(["build-bank", str(normals), "--out", str(other), "--overwrite"])
    assert rc == 2 and "not a memory bank folder" in one_line_error(capsys, "build-bank")
    assert (other / "keep.txt").read_text() == "mine"
    assert snapshot(normals) == before and snapshot(world["bank"]) == bank_before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "user-cache") == ["flat", "other"]  # no bank, no temporaries
