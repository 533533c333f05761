"""BraTS end to end with the real LiteMedSAM (bundled weights, CPU) through the command line: a
bank from the lesion-free FLAIR slices of two training subjects of a BraTS-2021-shaped root, then
a case folder of a third subject segmented with its seg paired as ground truth."""

from __future__ import annotations

import json

import pytest

from dataset_fixtures import brats2021_root
from napari_mias_sam.cli.commands import main

pytestmark = pytest.mark.slow


def test_brats_root_to_bank_to_case_dice(tmp_path, mias_cache_dir, capsys):
    root = brats2021_root(tmp_path / "BraTS2021_Training")
    (tmp_path / "test.txt").write_text("BraTS2021_00001\n")
    bank = tmp_path / "bank"
    assert main(["build-bank", str(root), "--modality", "flair", "--margin", "2", "--exclude-subjects",
                 str(tmp_path / "test.txt"), "--out", str(bank), "--device", "cpu", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert "from 17 slices of 2 sources" in built["summary"]  # normal_01's 14 + case_02's 3 (0-2: more than 2 from its lesion on 5-13)
    rc = main(["segment", str(root / "BraTS2021_00001"), "--bank", str(bank), "--out", str(tmp_path / "out"),
               "--device", "cpu", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rep = json.loads(cap.out)
    assert rep["outputs"]["mask"].endswith("BraTS2021_00001_flair_mask.nii.gz")
    assert rep["lesion_labels"]["counted"] == [1, 2, 4]
    m = rep["metrics"]
    # A bank of 17 held-out slices, fewer than the peaks' percentiles need: the regions default all
    # the same, on the small-bank levels (before issue 20 item 3 it fell back to cog-box on every slice)
    assert rep["settings"]["prompt"] == "regions" and rep["settings"]["mask_index"] == 1
    # The sample's lesion (bright, large) on 8 slices; a cross-subject bank of 17 slices.
    assert m["lesion_slices"] == 8 and m["cog_inside_lesion"]["hits"] >= 6, m
    assert m["slice_dice"] > 0.4, m
