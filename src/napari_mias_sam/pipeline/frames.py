"""What goes into the model: every volume's path to model frames (:func:`volume_frames`), and normal
data for memory banks (NIfTI volumes, folders of them, BMAD-style PNG slice folders) as slice groups."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..core import defaults
from ..bank import SliceGroup
from ..core.errors import InputError
from ..data.checks import check_slice_size
from ..data.volumes import find_volumes, is_nifti, load_volume, read_png_files
from ..method.preprocess import (
    foreground_slices,
    normalise_intensities,
    resolve_axis,
    to_frame,
    volume_slices,
    Preprocessing,
)

__all__ = ["PNG_PREPROCESSING", "volume_frames", "volume_groups", "png_groups", "normal_groups", "bmad_train_folder"]

# BMAD slices are saved min-max scaled per slice; the PNG grey levels / 255 are used as they are.
PNG_PREPROCESSING = {"mode": "png", "note": "PNG grey levels / 255 (BMAD slices are min-max scaled when saved)"}


def volume_frames(data: np.ndarray, prep: Preprocessing, axis: int, *, source: str = "volume",
                  encoding: str = "standard") -> tuple[torch.Tensor, np.ndarray]:
    """Normalise a volume, slice it along ``axis`` and put every slice in the model frame
    (``encoding``: see :func:`preprocess.to_frame`).

    Returns ``(frames (N, 256, 256), foreground (N,) bool)``; slices without anatomy are marked.
    ``data`` of shape (C, X, Y, Z): C co-registered sequences, each normalised on its own, give
    frames (N, C, 256, 256) (the encoder's channels); the foreground is the first sequence's.
    """
    if np.ndim(data) == 4:
        if encoding != "standard":
            raise InputError(f"{source}: several sequences go to the encoder with the standard encoding only, not {encoding!r}.")
        parts = [volume_frames(d, prep, axis, source=source, encoding=encoding) for d in data]
        return torch.stack([f for f, _ in parts], dim=1), parts[0][1]
    check_slice_size(data.shape, axis, source)
    norm = normalise_intensities(data, prep, source=source)
    slices = volume_slices(norm, axis)
    fg = foreground_slices(slices)
    return to_frame(slices, encoding=encoding), fg


def volume_groups(paths: list[Path], prep: Preprocessing, axis: int | str = defaults.SLICE_AXIS, *, encoding: str = "standard") -> list[SliceGroup]:
    """One :class:`SliceGroup` per NIfTI volume; empty or constant slices are skipped."""
    groups = []
    for p in paths:
        import nibabel as nib

        try:
            shape = nib.load(str(p)).shape
        except Exception as exc:
            raise InputError(f"{p}: cannot read this NIfTI file ({exc}).") from exc

        def load(p: Path = p) -> tuple[torch.Tensor, int, list[int]]:
            vol = load_volume(p)
            ax = resolve_axis(axis, vol.affine)
            frames, fg = volume_frames(vol.data, prep, ax, source=str(p), encoding=encoding)
            return frames[torch.from_numpy(fg)], int((~fg).sum()), np.flatnonzero(fg).tolist()

        ax_guess = resolve_axis(axis) if not isinstance(axis, str) or axis.isdigit() else 2
        n = int(shape[ax_guess]) if len(shape) >= 3 else 0
        groups.append(SliceGroup(name=p.name, n=n, load=load, path=str(p)))
    return groups


def bmad_train_folder(root: Path) -> Path | None:
    """The folder of normal training PNGs in a BMAD dataset (``train/good``), if ``root`` is one."""
    for cand in (root / "train" / "good", root / "good", root):
        if cand.is_dir() and any(q.suffix.lower() == ".png" for q in cand.iterdir()):
            return cand
    return None


def png_groups(folder: Path, *, blocks: int = 10, encoding: str = "standard") -> list[SliceGroup]:
    """PNG slices of a folder in ``blocks`` contiguous groups (sorted names keep a subject's slices
    together, so calibration holds out whole blocks rather than neighbouring slices)."""
    files = sorted(q for q in folder.iterdir() if q.suffix.lower() == ".png")
    if not files:
        raise InputError(f"{folder}: holds no PNG slices.")
    nb = max(1, min(blocks, len(files) // 2 or 1))
    parts = [list(a) for a in np.array_split(np.arange(len(files)), nb) if len(a)]
    groups = []
    for bi, idx in enumerate(parts):
        chunk = [files[i] for i in idx]

        def load(chunk: list[Path] = chunk, idx=idx) -> tuple[torch.Tensor, int, list[int]]:
            arrays = read_png_files(chunk)
            kept = [i for i, a in enumerate(arrays) if np.ptp(a) > 1e-6]
            if not kept:
                return torch.zeros((0, 256, 256)), len(arrays), []
            frames = torch.cat([to_frame(arrays[i][None], encoding=encoding) for i in kept])
            return frames, len(arrays) - len(kept), [int(idx[i]) for i in kept]  # positions in the sorted folder

        groups.append(SliceGroup(name=f"{folder.name}[{chunk[0].name}..{chunk[-1].name}]", n=len(chunk), load=load, path=str(folder)))
    return groups


def normal_groups(inputs: list[str | os.PathLike], prep: Preprocessing, axis: int | str = defaults.SLICE_AXIS, *,
                  encoding: str = "standard") -> tuple[list[SliceGroup], str]:
    """Groups for :func:`bank.build_bank` from files/folders; returns ``(groups, kind)`` where
    kind is ``"nifti"`` or ``"png"``. NIfTI and PNG inputs cannot be mixed in one bank."""
    nifti: list[Path] = []
    png_dirs: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            if any(is_nifti(q) for q in p.iterdir()):
                nifti.extend(find_volumes([p]))
                continue
            pngs = bmad_train_folder(p)
            if pngs is None:
                raise InputError(f"{p}: holds neither NIfTI volumes nor PNG slices (BMAD layout: train/good/*.png).")
            png_dirs.append(pngs)
        else:
            nifti.extend(find_volumes([p]))
    if nifti and png_dirs:
        raise InputError("mixing NIfTI volumes and PNG slice folders in one bank is not supported; build two banks.")
    if png_dirs:
        groups = [g for d in png_dirs for g in png_groups(d, encoding=encoding)]
        return groups, "png"
    return volume_groups(nifti, prep, axis, encoding=encoding), "nifti"
