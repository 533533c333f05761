"""Read users' copies of BMAD slice datasets (the data cannot be bundled).

Two layouts are recognised under a dataset root:

* BMAD: ``{valid|test}/{good,Ungood}/img/*.png`` with masks in ``.../anomaly_mask/*.png``
  (``good`` may have no masks: they are empty);
* the MIAS-SAM reference code's: ``test/test/{good,Ungood}/*.png`` with masks in
  ``test/test_labels/{good,Ungood}/*.png``.

Masks may be multi-level: they are binarised with ``> 0``. Normal training slices are in
``train/good`` (see :func:`sources.bmad_train_folder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..data.volumes import read_png_files

__all__ = ["SliceSet", "find_test_layout", "read_bmad_test"]


@dataclass
class SliceSet:
    """2D test slices with pixel masks and slice labels (1 = anomalous)."""

    names: list[str]
    images: list[np.ndarray]  # float32 in [0, 1]
    masks: list[np.ndarray]  # bool
    labels: np.ndarray  # int (N,)


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png") if folder.is_dir() else []


def find_test_layout(root: str | Path, split: str = "test") -> dict[str, tuple[Path, Path | None]]:
    """Map ``good``/``Ungood`` to (image folder, mask folder or None) for either layout."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder.")
    bmad = {}
    for cls in ("good", "Ungood"):
        img = root / split / cls / "img"
        if img.is_dir():
            msk = root / split / cls / "anomaly_mask"
            bmad[cls] = (img, msk if msk.is_dir() else None)
    if "Ungood" in bmad:
        return bmad
    ref = {}
    for cls in ("good", "Ungood"):
        img = root / "test" / "test" / cls
        if img.is_dir():
            msk = root / "test" / "test_labels" / cls
            ref[cls] = (img, msk if msk.is_dir() else None)
    if "Ungood" in ref:
        return ref
    raise InputError(
        f"{root}: not a BMAD dataset. Expected {split}/{{good,Ungood}}/img/*.png with anomaly_mask/ beside img/, "
        "or the reference layout test/test/{good,Ungood}/*.png with test/test_labels/{good,Ungood}/*.png."
    )


def read_bmad_test(root: str | Path, split: str = "test", *, limit: int | None = None) -> SliceSet:
    """Read the test (or ``split="valid"``) slices of a BMAD dataset with masks and labels."""
    layout = find_test_layout(root, split)
    names: list[str] = []
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    labels: list[int] = []
    for cls in ("good", "Ungood"):
        if cls not in layout:
            continue
        img_dir, mask_dir = layout[cls]
        files = _pngs(img_dir)[:limit] if limit else _pngs(img_dir)
        imgs = read_png_files(files)
        for f, im in zip(files, imgs):
            m = None
            if mask_dir is not None:
                cands = [mask_dir / f.name] + sorted(mask_dir.glob(f.stem + ".*"))
                found = next((c for c in cands if c.is_file()), None)
                if found is not None:
                    (m,) = read_png_files([found], as_mask=True)
                    if m.shape != im.shape:
                        raise InputError(f"{found}: mask shape {m.shape} differs from its image {f} {im.shape}.")
            if m is None:
                if cls == "Ungood":
                    raise InputError(f"{f}: anomalous slice without a mask in {mask_dir}.")
                m = np.zeros(im.shape, dtype=bool)
            names.append(f"{cls}/{f.name}")
            images.append(im)
            masks.append(m)
            labels.append(1 if cls == "Ungood" else 0)
    if not images:
        raise InputError(f"{root}: the {split} folders hold no PNG slices.")
    return SliceSet(names=names, images=images, masks=masks, labels=np.asarray(labels, dtype=int))
