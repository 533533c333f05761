"""What the method needs of an input volume, checked with the file's name in every message:
real-valued voxels (complex and RGB refused by name), a finite invertible affine, slices large
enough for the 32 x 32 patch grid, and label maps without negative labels."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np

from ..core.errors import Cancelled, InputError, MiasSamError

__all__ = [
    "MIN_SLICE_SIDE",
    "MAX_SLICE_ASPECT",
    "check_voxel_dtype",
    "check_affine",
    "check_slice_size",
    "check_labels",
    "about",
]

#: Fewest voxels along each in-plane side of a slice.
MIN_SLICE_SIDE = 8
#: Longest in-plane side over the shortest: beyond it the slice covers under 1/8 of the model's
#: square frame, i.e. fewer than 4 of the 32 patch rows (the rest is padding).
MAX_SLICE_ASPECT = 8.0
_AXIS_NAMES = {0: "first (i)", 1: "second (j)", 2: "third (k)"}


def check_voxel_dtype(dtype: np.dtype, path: str | os.PathLike) -> None:
    """Refuse voxel types that have no single real intensity: RGB/RGBA colour and complex numbers."""
    dtype = np.dtype(dtype)
    if dtype.names:  # NIfTI RGB24 / RGBA32 are structured (R, G, B[, A]) uint8 voxels
        kind = "RGBA" if len(dtype.names) == 4 else "RGB"
        raise InputError(f"{path}: stores {kind} colour voxels ({kind}{8 * dtype.itemsize}), not one intensity per voxel; "
                         "convert it to a single-channel (grey) volume first, e.g. the mean of R, G and B.")
    if dtype.kind == "c":
        raise InputError(f"{path}: stores complex voxels ({dtype}); MIAS-SAM needs real intensities. Save the "
                         "magnitude (abs) or the real part as its own volume first.")
    if dtype.kind not in "biuf":
        raise InputError(f"{path}: voxel type {dtype} is not a number type; expected integer or floating-point intensities.")


def check_affine(affine: np.ndarray, path: str | os.PathLike) -> None:
    """Refuse an affine (voxel -> world) that is not finite or not invertible (e.g. all zeros)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(f"{path}: its affine (voxel-to-world matrix in the header) holds NaN or infinite values; "
                         "fix the header's qform/sform (e.g. re-save it from the scanner export or with fslorient).")
    m = a[:3, :3]
    scale = float(np.abs(m).max())
    if scale == 0.0 or abs(np.linalg.det(m)) <= (1e-9 * scale) ** 3 or np.linalg.cond(m) > 1e8:
        raise InputError(f"{path}: its affine (voxel-to-world matrix in the header) is not invertible "
                         f"({'all zeros' if scale == 0.0 else 'voxel axes collapse onto each other'}); fix the header's "
                         "qform/sform (voxel sizes must be non-zero) before using this file.")


def check_slice_size(shape: tuple[int, ...], axis: int, path: str | os.PathLike) -> None:
    """Refuse slices (the two sides other than ``axis``) too small or too elongated for the patch grid."""
    sides = [int(s) for i, s in enumerate(shape[:3]) if i != axis]
    short, long_ = min(sides), max(sides)
    if short < MIN_SLICE_SIDE or long_ > MAX_SLICE_ASPECT * short:
        shown = " x ".join(str(s) for s in sides)
        raise InputError(
            f"{path}: slices across the {_AXIS_NAMES.get(axis, axis)} axis are {shown} voxels; MIAS-SAM needs at least "
            f"{MIN_SLICE_SIDE} x {MIN_SLICE_SIDE} voxels per slice with sides at most {MAX_SLICE_ASPECT:g}:1 (its 32 x 32 "
            "patch grid spans the slice). Check the slicing axis (--axis) or the file's orientation."
        )


def check_labels(labels: np.ndarray, path: str | os.PathLike) -> None:
    """Refuse negative labels: 0 is background and lesions are positive; a negative value (often
    -1 for 'ignore', or a signed type read wrongly) would be neither and leave Dice undefined."""
    lo = int(labels.min()) if labels.size else 0
    if lo < 0:
        n = int((labels < 0).sum())
        raise InputError(f"{path}: ground truth holds negative labels ({n} voxels, minimum {lo}); expected 0 for "
                         "background and positive labels for lesions. Set those voxels to 0 (or their label) and re-save it.")


@contextlib.contextmanager
def about(path: str | os.PathLike) -> Iterator[None]:
    """Errors inside the block name ``path``: a numerical failure deep in a library (for example
    'SVD did not converge') becomes a one-line :class:`InputError` that says which file."""
    try:
        yield
    except Cancelled:
        raise
    except MiasSamError as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from exc
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
        if str(path) in str(exc):
            raise
        raise InputError(f"{path}: {exc}") from exc


