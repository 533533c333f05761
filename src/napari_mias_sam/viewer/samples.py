"""napari sample data: the bundled brain MRI test cases with their ground truth as Labels, and a
normal (lesion-free) volume of the kind the memory bank is built from."""

from __future__ import annotations

from pathlib import Path

from ..core.paths import sample_data_dir
from ..core.errors import InputError
from .models.layers import read_nifti_layers

__all__ = ["case_01", "case_02", "normal_01", "sample_layers"]


def _file(name: str) -> Path:
    path = sample_data_dir() / name
    if not path.is_file():
        raise InputError(
            f"{path}: sample file missing; reinstall napari-mias-sam (pip install --force-reinstall napari-mias-sam)."
        )
    return path


def sample_layers(stem: str, *, with_gt: bool = True) -> list[tuple]:
    """``<stem>.nii.gz`` as an Image layer and, with ``with_gt``, ``<stem>_seg.nii.gz`` as Labels."""
    layers = read_nifti_layers(_file(f"{stem}.nii.gz"))
    if with_gt:
        gt = read_nifti_layers(_file(f"{stem}_seg.nii.gz"))
        for data, kwargs, kind in gt:
            kwargs["name"] = f"{stem} ground truth"
            layers.append((data, kwargs, "labels"))
    return layers


def case_01() -> list[tuple]:
    """Test case 1 (one lesion) and its ground truth."""
    return sample_layers("case_01")


def case_02() -> list[tuple]:
    """Test case 2 (a bright and a dark lesion) and its ground truth."""
    return sample_layers("case_02")


def normal_01() -> list[tuple]:
    """A lesion-free volume of the kind the memory bank is built from."""
    return sample_layers("normal_01", with_gt=False)
