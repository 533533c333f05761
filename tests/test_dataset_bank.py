"""A memory bank from the lesion-free slices of a labelled dataset (fake backbone for speed):
which slices go in (margin, anatomy, LiTS's liver ROI), subjects kept apart, and what the
manifest records."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest

from fakes import FakeBackbone
from dataset_fixtures import brats2021_root, brats2023_root, lits_root
from napari_mias_sam.jobs.bank_builds import build_bank_from_dataset
from napari_mias_sam.jobs.dataset_runs import check_disjoint, load_case
from napari_mias_sam.data.datasets import find_cases
from napari_mias_sam.core.errors import InputError


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("dsbank")
    return {"b21": brats2021_root(base / "b21"), "b23": brats2023_root(base / "b23"), "lits": lits_root(base / "lits")}


def _expected(seg_path, margin, normal=(0,)):
    lab = np.asarray(nib.load(str(seg_path)).dataobj)
    bad = np.flatnonzero((~np.isin(lab, normal)).any(axis=(0, 1)))
    return [k for k in range(lab.shape[2]) if all(abs(k - b) > margin for b in bad)]


def test_bank_takes_lesion_free_slices_beyond_the_margin(roots, tmp_path):
    fake = FakeBackbone()
    sub = tmp_path / "train.txt"
    sub.write_text("BraTS2021_00001\nBraTS2021_00003\n")
    bank = build_bank_from_dataset(roots["b21"], fake, modality="flair", margin=2, subjects=sub, layout="mean256")
    src = bank.manifest["sources"]
    assert [s["subject"] for s in src] == ["BraTS2021_00001", "BraTS2021_00003"]
    case = find_cases(roots["b21"])[0]
    # case_01's tumour is on axial slices 4-11: with margin 2, slices 0-1 and 14-15 remain
    assert src[0]["slices"] == _expected(case.seg, 2) == [0, 1, 14, 15]
    assert src[0]["path"] == str(case.image("flair")) and src[0]["lesion_slices"] == 8 and src[0]["margin_slices"] == 4
    assert src[1]["slices"] == list(range(14))  # the tumour-free subject: every slice with anatomy
    assert bank.manifest["counts"]["slices"] == 4 + 14 and bank.ntotal == 18 * 1024
    ds = bank.manifest["dataset"]
    assert ds["layout"] == "brats2021" and ds["modality"] == "flair" and ds["margin"] == 2
    assert ds["subjects"] == ["BraTS2021_00001", "BraTS2021_00003"] and ds["preprocess"] == "mri"
    # margin 0 keeps the slices next to the tumour
    bank0 = build_bank_from_dataset(roots["b21"] / "BraTS2021_00001", fake, modality="t2", margin=0, layout="mean256")
    assert bank0.manifest["sources"][0]["slices"] == [0, 1, 2, 3, 12, 13, 14, 15]
    assert bank0.manifest["sources"][0]["name"] == "BraTS2021_00001_t2.nii.gz"


def test_bank_saved_and_test_subjects_kept_apart(roots, tmp_path):
    fake = FakeBackbone()
    test = tmp_path / "test.txt"
    test.write_text("BraTS-GLI-00001-000\n")
    bank = build_bank_from_dataset(roots["b23"], fake, modality="t2f", exclude=test, layout="mean256")
    assert bank.manifest["dataset"]["subjects"] == ["BraTS-GLI-00002-000"] and bank.manifest["dataset"]["modality"] == "flair"
    bank.save(tmp_path / "bank")
    cases = find_cases(roots["b23"])
    check_disjoint(bank, [cases[0]])
    with pytest.raises(InputError, match="BraTS-GLI-00002-000 is both in the bank"):
        check_disjoint(bank, cases)


def test_lits_bank_with_the_liver_roi(roots):
    fake = FakeBackbone()
    bank = build_bank_from_dataset(roots["lits"], fake, roi="liver", layout="mean256")
    ds = bank.manifest["dataset"]
    assert ds["layout"] == "lits" and ds["modality"] == "ct" and ds["preprocess"] == "ct-abdomen"
    assert ds["roi"] == "liver" and ds["roi_labels"] == [1, 2] and ds["normal_labels"] == [0, 1]
    assert bank.manifest["preprocessing"]["mode"] == "ct"
    by = {s["subject"]: s for s in bank.manifest["sources"]}
    # volume-2 and -3: their tumours (label 2) sit on slices 4-11; the liver (label 1) is normal tissue
    assert by["volume-2"]["slices"] == [0, 1, 14, 15] and by["volume-3"]["slices"] == [0, 1, 14, 15]
    assert by["volume-0"]["slices"] == list(range(14))
    # the ROI masks the image: outside the liver it is below the CT window
    cd = load_case(find_cases(roots["lits"])[2], roi="liver")
    outside = ~np.isin(cd.labels.data, (1, 2))
    assert cd.image.data[outside].max() <= -1024 and cd.image.meta["roi"] == "liver"
    # a volume opened elsewhere (the widget's layer) is masked the same way for this bank
    from napari_mias_sam.jobs.run import roi_for_bank
    from napari_mias_sam.data.volumes import Volume, load_volume

    vol = load_volume(roots["lits"] / "volume-2.nii")
    np.testing.assert_array_equal(roi_for_bank(vol, bank.manifest).data, cd.image.data)
    assert roi_for_bank(vol, {"dataset": {"roi": None}}) is vol
    with pytest.raises(InputError, match="built with --roi liver"):
        roi_for_bank(Volume(vol.data, vol.affine), bank.manifest)


def test_dataset_bank_refusals(roots, tmp_path):
    fake = FakeBackbone()
    with pytest.raises(InputError, match="has no ct image"):
        build_bank_from_dataset(roots["b21"], fake, modality="ct")
    with pytest.raises(InputError, match="--roi liver"):
        build_bank_from_dataset(roots["b21"], fake, roi="liver")
    with pytest.raises(InputError, match="--margin"):
        build_bank_from_dataset(roots["b21"], fake, margin=-1)
