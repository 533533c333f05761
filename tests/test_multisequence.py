"""Multi-sequence banks for BraTS: three co-registered sequences of each case fill the encoder's
three channels, for the bank and every run with it (2021 and 2023+ names), recorded in the bank;
a case without one of them is refused with one line naming the missing file; runs read the same
three; the frames really carry three different sequences."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import napari_mias_sam.backbones as backbones_mod
from dataset_fixtures import brats2021_root, brats2023_root
from napari_mias_sam.cli.commands import main
from napari_mias_sam.core.errors import InputError
from napari_mias_sam.data.datasets import find_cases
from napari_mias_sam.data.sequences import parse_sequences
from napari_mias_sam.jobs.dataset_runs import load_case, sequences_for_bank
from napari_mias_sam.data.volumes import load_volume
from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
from napari_mias_sam.pipeline.frames import volume_frames
from test_cli import fake_loader, one_line_error


@pytest.fixture(autouse=True)
def _fake(tmp_path, monkeypatch):
    monkeypatch.setenv("MIAS_SAM_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader())


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiseq")
    (base / "test.txt").write_text("BraTS2021_00001\n")
    (base / "test23.txt").write_text("BraTS-GLI-00001-000\n")
    return {"base": base, "b21": brats2021_root(base / "b21"), "b23": brats2023_root(base / "b23")}


def test_sequence_names():
    assert parse_sequences("flair,t1ce,t2") == ("flair", "t1ce", "t2") == parse_sequences("t2f, t1c, t2w")
    assert parse_sequences("t1n") == ("t1",)
    for bad, msg in (("flair,t1", "one sequence or three"), ("flair,flair,t2", "named twice"), ("flair,dwi,t2", "unknown modality")):
        with pytest.raises(InputError, match=msg):
            parse_sequences(bad)


def test_frames_carry_three_sequences(roots):
    case = next(c for c in find_cases(roots["b21"]) if c.subject == "BraTS2021_00001")
    cd = load_case(case, "flair,t1ce,t2", need_labels=True)
    assert cd.image.channels.shape == (3, *cd.image.shape)
    prep = PREPROCESS_PRESETS["mri"]
    frames, fg = volume_frames(cd.image.channels, prep, 2)
    assert frames.shape[1:] == (3, 256, 256)
    for i, mod in enumerate(("flair", "t1ce", "t2")):  # each channel is that sequence, normalised on its own
        one, fg1 = volume_frames(load_volume(case.images[mod]).data, prep, 2)
        assert torch.equal(frames[:, i], one)
    assert np.array_equal(fg, volume_frames(load_volume(case.images["flair"]).data, prep, 2)[1])
    assert not torch.equal(frames[:, 0], frames[:, 1])


@pytest.mark.parametrize("layout, spec", [("b21", "flair,t1ce,t2"), ("b23", "t2f,t1c,t2w")])
def test_build_segment_and_evaluate_with_three_sequences(roots, tmp_path, capsys, layout, spec):
    root, bank = roots[layout], tmp_path / "bank"
    test = roots["base"] / ("test.txt" if layout == "b21" else "test23.txt")
    assert main(["build-bank", str(root), "--modality", spec, "--exclude-subjects", str(test),
                 "--layout", "mean256", "--out", str(bank), "--json"]) == 0
    capsys.readouterr()
    assert main(["info", str(bank), "--json"]) == 0
    ds = json.loads(capsys.readouterr().out)["dataset"]
    assert ds["sequences"] == ["flair", "t1ce", "t2"] and ds["modality"] == "flair"
    case = sorted(p for p in root.iterdir() if p.is_dir())[0]  # the test subject
    assert main(["segment", str(case), "--bank", str(bank), "--out", str(tmp_path / "out"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "lesionwise" in rep["metrics"] and (tmp_path / "out").is_dir()
    assert main(["evaluate", "--bank", str(bank), "--dataset", str(root), "--subjects", str(test),
                 "--out", str(tmp_path / "eval"), "--json", "--gammas", "5", "--ks", "1", "--prompts", "cog-box"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["data"]["dataset"]["modality"] == "flair,t1ce,t2" and res["rows"][0]["lesionwise"]["cases"] == 1
    img = next(case.glob("*_flair.nii.gz"), None) or next(case.glob("*-t2f.nii.gz"))
    seg = next(case.glob("*seg.nii.gz"))
    assert main(["evaluate", "--bank", str(bank), "--images", str(img), "--gts", str(seg), "--out", str(tmp_path / "e2")]) == 2
    assert "evaluated on BraTS case folders with --dataset" in one_line_error(capsys, "evaluate")
    # --modality must agree with the bank's sequences
    assert main(["segment", str(case), "--bank", str(bank), "--out", str(tmp_path / "o2"), "--modality", "flair"]) == 2
    assert "the bank was built from the sequences flair,t1ce,t2" in one_line_error(capsys, "segment")


def test_a_case_without_a_sequence_is_refused_naming_the_file(roots, tmp_path, capsys):
    import shutil

    root = tmp_path / "b21"
    shutil.copytree(roots["b21"], root)
    missing = root / "BraTS2021_00002" / "BraTS2021_00002_t1ce.nii.gz"
    missing.unlink()
    assert main(["build-bank", str(root), "--modality", "flair,t1ce,t2", "--out", str(tmp_path / "bank")]) == 2
    err = one_line_error(capsys, "build-bank")
    assert f"{missing}: missing; the bank takes flair, t1ce, t2 from every case" in err
    assert not (tmp_path / "bank").exists()
    # a run with a three-sequence bank on a case without one of them: the same line
    bank = tmp_path / "bank3"
    assert main(["build-bank", str(roots["b21"]), "--modality", "flair,t1ce,t2", "--exclude-subjects",
                 str(roots["base"] / "test.txt"), "--layout", "mean256", "--out", str(bank)]) == 0
    capsys.readouterr()
    assert main(["segment", str(root / "BraTS2021_00002"), "--bank", str(bank), "--out", str(tmp_path / "o")]) == 2
    assert f"{missing}: missing" in one_line_error(capsys, "segment")
    # a file outside any case folder cannot give three sequences
    loose = tmp_path / "loose.nii.gz"
    shutil.copy(roots["b21"] / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz", loose)
    assert main(["segment", str(loose), "--bank", str(bank), "--out", str(tmp_path / "o3")]) == 2
    assert "give the case folder" in one_line_error(capsys, "segment")
    from napari_mias_sam.bank import load_bank

    with pytest.raises(InputError, match="open a volume of a BraTS case folder"):
        sequences_for_bank(load_volume(loose), load_bank(bank).manifest)
    vol = sequences_for_bank(load_volume(roots["b21"] / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"), load_bank(bank).manifest)
    assert vol.channels.shape[0] == 3 and vol.meta["sequences"] == ["flair", "t1ce", "t2"]
