"""A small volume test set shared by the evaluation tests (tests/evaluation/test_sweep.py and
tests/scripts/test_prompt_study.py): three normal volumes made into a bank with the fake backbone, and two
test volumes with a bright disc lesion on slices 2 and 3 and their ground truths."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from fakes import intensity_disc_fake
from napari_mias_sam.method.preprocess import Preprocessing
from napari_mias_sam.jobs.bank_builds import build_bank_from_files

YY, XX = np.mgrid[:48, :56]


def lesion_volume(seed: int, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """(image, ground truth) of shape (48, 56, 6): an elliptic 'head', noise, and optionally a disc
    of radius 5 centred at row 20, column 30 on slices 2 and 3."""
    r = np.random.default_rng(seed)
    base = np.zeros((48, 56, 6), np.float32)
    base[((YY - 24) / 20) ** 2 + ((XX - 28) / 24) ** 2 < 1] = 100
    base += r.normal(0, 3, base.shape).astype(np.float32)
    gt = np.zeros(base.shape, np.uint8)
    if lesion:
        m = (YY - 20) ** 2 + (XX - 30) ** 2 < 25
        for z in (2, 3):
            base[..., z][m] = 220
            gt[..., z][m] = 1
    return base, gt


def write_eval_set(d: Path):
    """Write the set under ``d``; returns (fake backbone, bank, test image paths, ground truth paths)."""
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    normals = []
    for i in range(3):
        b, _ = lesion_volume(i, False)
        nib.save(nib.Nifti1Image(b, aff), d / f"n{i}.nii.gz")
        normals.append(d / f"n{i}.nii.gz")
    imgs, gts = [], []
    for i in range(2):
        b, g = lesion_volume(10 + i, True)
        nib.save(nib.Nifti1Image(b, aff), d / f"t{i}.nii.gz")
        nib.save(nib.Nifti1Image(g, aff), d / f"t{i}_seg.nii.gz")
        imgs.append(d / f"t{i}.nii.gz")
        gts.append(d / f"t{i}_seg.nii.gz")
    bb = intensity_disc_fake()
    bank = build_bank_from_files(normals, bb, preprocessing=Preprocessing())
    return bb, bank, imgs, gts
