"""Small BraTS-2021-, BraTS-2023- and LiTS-shaped dataset folders made from the bundled sample
volumes (real healthy anatomy, synthetic lesions), written to a temporary folder by the tests.

The sample cases are 155 x 192 x 16 voxels with their lesion on axial slices 4-11; the normal
volumes are 155 x 192 x 14 and lesion-free. Every case folder holds four "modalities" (the
sample image under four different intensity curves) and a segmentation relabelled to the
release's label values; a LiTS case is a CT-like volume in Hounsfield units with a "liver"
(label 1) and a "tumour" (label 2).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data"

#: BraTS 2021 suffix -> BraTS 2023 suffix
NEW_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}


def _read(name: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(SAMPLE_DIR / f"{name}.nii.gz"))
    return np.asarray(img.dataobj), np.asarray(img.affine)


def write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def modalities(image: np.ndarray) -> dict[str, np.ndarray]:
    """Four distinct 'sequences' of one image (int16): identity, inverted in the brain, squared, root."""
    x = image.astype(np.float32)
    brain = x > 0
    top = float(x.max()) or 1.0
    return {
        "flair": x.astype(np.int16),
        "t1": np.where(brain, top - x + 50, 0).astype(np.int16),
        "t1ce": (x**2 / top).astype(np.int16),
        "t2": (np.sqrt(x * top)).astype(np.int16),
    }


def brats_labels(seg: np.ndarray, enhancing: int = 4) -> np.ndarray:
    """0/1 lesion -> BraTS sub-regions: oedema 2 (the rim), necrotic core 1, enhancing ``enhancing``."""
    les = seg > 0
    plane = np.ones((3, 3, 1), bool)  # in-plane: the sample's slices are 4 mm thick
    core = ndimage.binary_erosion(les, plane, iterations=3)
    inner = ndimage.binary_erosion(core, plane, iterations=3)
    out = np.where(les, 2, 0)
    out = np.where(core, enhancing, out)
    out = np.where(inner, 1, out)
    return out.astype(np.uint8)


def brats_case(root: Path, subject: str, source: str, *, new_names: bool = False) -> Path:
    """One BraTS case folder from the sample volume ``source`` (case_01, case_02, normal_01...)."""
    image, affine = _read(source)
    seg = _read(f"{source}_seg")[0] if (SAMPLE_DIR / f"{source}_seg.nii.gz").is_file() else np.zeros(image.shape, np.uint8)
    labels = brats_labels(seg, enhancing=3 if new_names else 4)
    folder = root / subject
    sep = "-" if new_names else "_"
    for mod, data in {**modalities(image), "seg": labels}.items():
        suffix = NEW_NAMES[mod] if new_names else mod
        write(folder / f"{subject}{sep}{suffix}.nii.gz", data, affine)
    return folder


def brats2021_root(root: Path) -> Path:
    """BraTS2021_00001 (case_01), BraTS2021_00002 (case_02), BraTS2021_00003 (normal_01, no tumour)."""
    for subject, source in (("BraTS2021_00001", "case_01"), ("BraTS2021_00002", "case_02"), ("BraTS2021_00003", "normal_01")):
        brats_case(root, subject, source)
    return root


def brats2023_root(root: Path) -> Path:
    for subject, source in (("BraTS-GLI-00001-000", "case_01"), ("BraTS-GLI-00002-000", "normal_02")):
        brats_case(root, subject, source, new_names=True)
    return root


def to_hu(image: np.ndarray) -> np.ndarray:
    """Brain MRI grey levels (0-1,000) -> a CT-like volume: air -1000 HU, tissue 0-200 HU."""
    x = image.astype(np.float32)
    return np.where(x > 0, x / max(float(x.max()), 1.0) * 200.0, -1000.0).astype(np.int16)


def lits_case(root: Path, n: int, source: str, *, tumour: str = "lesion", gz: bool = False) -> tuple[Path, Path]:
    """``volume-n`` and ``segmentation-n``: 'liver' (1) = the whole brain; 'tumour' (2) = the
    sample's lesion (``tumour="lesion"``), a small blob far from it (``"elsewhere"``), or none."""
    image, affine = _read(source)
    has_seg = (SAMPLE_DIR / f"{source}_seg.nii.gz").is_file()
    lesion = (_read(f"{source}_seg")[0] > 0) if has_seg else np.zeros(image.shape, bool)
    labels = np.where(image > 0, 1, 0).astype(np.uint8)
    if tumour == "lesion":
        labels[lesion] = 2
    elif tumour == "elsewhere":
        # A small blob on the other side of the brain, on the lesion's slices.
        ks = np.flatnonzero(lesion.any(axis=(0, 1)))
        ci, cj = (np.array(np.nonzero(lesion.any(axis=2))).mean(axis=1)).round().astype(int)
        oi = image.shape[0] - 1 - ci
        rr, cc = np.indices(image.shape[:2])
        blob = ((rr - oi) ** 2 + (cc - cj) ** 2) <= 36
        for k in ks:
            labels[..., k][blob & (image[..., k] > 0)] = 2
    ext = ".nii.gz" if gz else ".nii"
    v = write(root / f"volume-{n}{ext}", to_hu(image), affine)
    s = write(root / f"segmentation-{n}{ext}", labels, affine)
    return v, s


def lits_root(root: Path) -> Path:
    """volume-0 (normal_01, no tumour), volume-1 (normal_02), volume-2 (case_01, tumour = lesion),
    volume-3 (case_01, tumour far from the lesion)."""
    lits_case(root, 0, "normal_01", tumour="none")
    lits_case(root, 1, "normal_02", tumour="none", gz=True)
    lits_case(root, 2, "case_01", tumour="lesion")
    lits_case(root, 3, "case_01", tumour="elsewhere")
    return root
