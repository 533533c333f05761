"""Dataset layouts recognised by name (BraTS 2021, BraTS 2023+, LiTS, roots of cases), lesion
labels, subject lists and lesion-free slice selection (pure functions, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from dataset_fixtures import brats2021_root, brats2023_root, brats_case, lits_case, lits_root, write
from napari_mias_sam.data.datasets import (
    canonical_modality,
    case_for_file,
    check_case,
    find_cases,
    lesion_description,
    lesion_mask,
    normal_slices,
    parse_lesion_labels,
    read_case_folder,
    read_subject_list,
    select_cases,
)
from napari_mias_sam.core.errors import InputError


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("datasets")
    return {"b21": brats2021_root(base / "b21"), "b23": brats2023_root(base / "b23"), "lits": lits_root(base / "lits")}


def test_brats2021_root(roots):
    cases = find_cases(roots["b21"])
    assert [c.subject for c in cases] == ["BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"]
    c = cases[0]
    assert c.kind == "brats2021" and set(c.images) == {"flair", "t1", "t1ce", "t2"}
    assert c.seg.name == "BraTS2021_00001_seg.nii.gz" and c.image("flair").name == "BraTS2021_00001_flair.nii.gz"
    assert c.info.lesion is None  # whole tumour
    assert find_cases(roots["b21"] / "BraTS2021_00002")[0].subject == "BraTS2021_00002"  # a case folder alone


def test_brats2023_vocabulary_is_the_2021_one(roots):
    (c, _) = find_cases(roots["b23"])
    assert c.kind == "brats2023" and c.subject == "BraTS-GLI-00001-000"
    assert c.image("flair").name.endswith("-t2f.nii.gz") and c.image("t2f") == c.image("flair")
    assert c.image("t1ce").name.endswith("-t1c.nii.gz") and c.image("t1").name.endswith("-t1n.nii.gz")
    assert c.image("T2W").name.endswith("-t2w.nii.gz")
    with pytest.raises(InputError, match="has no ct image"):
        c.image("ct")
    with pytest.raises(InputError, match="unknown modality"):
        canonical_modality("dwi")


@pytest.mark.parametrize("prefix", ["BraTS-MEN", "BraTS-MET", "BraTS-PED", "BraTS-SSA"])
def test_other_brats_tracks(tmp_path, prefix):
    folder = tmp_path / f"{prefix}-00007-001"
    for suf in ("t2f", "t1c", "seg"):
        write(folder / f"{folder.name}-{suf}.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
    c = read_case_folder(folder)
    assert c.subject == folder.name and c.kind == "brats2023" and set(c.images) == {"flair", "t1ce"}


def test_lits_flat_files(roots):
    cases = find_cases(roots["lits"])
    assert [c.subject for c in cases] == ["volume-0", "volume-1", "volume-2", "volume-3"]
    assert cases[1].images["ct"].name == "volume-1.nii.gz" and cases[1].seg.name == "segmentation-1.nii.gz"
    assert cases[0].info.lesion == (2,) and cases[0].info.normal == (0, 1) and cases[0].info.rois["liver"] == (1, 2)
    assert case_for_file(roots["lits"] / "volume-2.nii").subject == "volume-2"
    assert case_for_file(roots["lits"] / "segmentation-3.nii").seg.name == "segmentation-3.nii"
    assert case_for_file(roots["b21"] / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz").subject == "BraTS2021_00001"


def test_lits_batch_folders(tmp_path):
    lits_case(tmp_path / "Training Batch 1", 0, "normal_01", tumour="none")
    lits_case(tmp_path / "Training Batch 2", 28, "case_01")
    assert [c.subject for c in find_cases(tmp_path)] == ["volume-0", "volume-28"]


def test_bad_layouts(tmp_path, roots):
    with pytest.raises(InputError, match="holds no dataset cases"):
        find_cases((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(InputError, match="no such folder"):
        find_cases(tmp_path / "missing")
    two = brats_case(tmp_path / "two", "BraTS2021_00009", "case_01")
    (two / "BraTS2021_00009_seg.nii").write_bytes((two / "BraTS2021_00009_seg.nii.gz").read_bytes())
    with pytest.raises(InputError, match="two segmentation files"):
        find_cases(two)
    mixed = tmp_path / "mixed"
    brats_case(mixed, "BraTS2021_00001", "case_01")
    lits_case(mixed, 0, "normal_01")
    with pytest.raises(InputError, match="mixes LiTS and BraTS"):
        find_cases(mixed)


def test_check_case_grids(tmp_path):
    folder = brats_case(tmp_path, "BraTS2021_00005", "case_01")
    check_case(read_case_folder(folder))
    seg = folder / "BraTS2021_00005_seg.nii.gz"
    write(seg, np.zeros((155, 192, 16), np.uint8), np.diag([2.0, 1, 1, 1]))
    with pytest.raises(InputError, match="_seg.nii.gz: segmentation affine differs"):
        check_case(read_case_folder(folder))
    write(folder / "BraTS2021_00005_t2.nii.gz", np.zeros((155, 192, 12), np.int16), np.eye(4))
    with pytest.raises(InputError, match=r"_t2.nii.gz: image of shape \(155, 192, 12\) differs"):
        check_case(read_case_folder(folder), seg=False)


def test_lesion_labels():
    labels = np.array([0, 1, 2, 3, 4])
    assert parse_lesion_labels("1,2,4") == (1, 2, 4) and parse_lesion_labels(" 4 1 ") == (1, 4)
    assert parse_lesion_labels("nonzero") is None and parse_lesion_labels("") is None
    with pytest.raises(InputError, match="background"):
        parse_lesion_labels("0,1")
    with pytest.raises(InputError, match="expected integers"):
        parse_lesion_labels("tumour")
    assert lesion_mask(labels, None).tolist() == [False, True, True, True, True]
    assert lesion_mask(labels, (2,)).tolist() == [False, False, True, False, False]
    assert lesion_mask(labels.astype(np.float32), (1, 4)).tolist() == [False, True, False, False, True]
    d = lesion_description((2,), np.array([0, 1, 1, 2]), source="LiTS default")
    assert d == {"rule": "labels 2", "labels": [2], "present": [1, 2], "counted": [2], "source": "LiTS default"}


def test_normal_slices_margin():
    lab = np.zeros((4, 4, 12), np.uint8)
    lab[..., 5:7] = 2  # lesion on slices 5 and 6
    assert np.flatnonzero(normal_slices(lab, 2, margin=2)).tolist() == [0, 1, 2, 9, 10, 11]
    assert np.flatnonzero(normal_slices(lab, 2, margin=0)).tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    lab[..., 0] = 1  # LiTS: liver is normal tissue
    assert np.flatnonzero(normal_slices(lab, 2, margin=1, normal=(0, 1))).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert not normal_slices(lab, 2, margin=1)[0]  # with background only normal, label 1 is not


def test_subject_lists(tmp_path, roots):
    cases = find_cases(roots["b21"])
    f = tmp_path / "test.txt"
    f.write_text("# test split\nBraTS2021_00002\n\n/data/BraTS2021_00003/  # a path is fine\n")
    assert read_subject_list(f) == ["BraTS2021_00002", "BraTS2021_00003"]
    assert [c.subject for c in select_cases(cases, exclude=f)] == ["BraTS2021_00001"]
    assert [c.subject for c in select_cases(cases, subjects=f)] == ["BraTS2021_00002", "BraTS2021_00003"]
    g = tmp_path / "train.txt"
    g.write_text("BraTS2021_00001, BraTS2021_00002\n")
    with pytest.raises(InputError, match="BraTS2021_00002 is in both"):
        select_cases(cases, subjects=g, exclude=f)
    typo = tmp_path / "typo.txt"
    typo.write_text("BraTS2021_0001\n")
    with pytest.raises(InputError, match="not in the dataset"):
        select_cases(cases, exclude=typo)
    lits = find_cases(roots["lits"])
    (tmp_path / "l.txt").write_text("2\nvolume-3.nii\n")
    assert [c.subject for c in select_cases(lits, subjects=tmp_path / "l.txt")] == ["volume-2", "volume-3"]
