"""Slabs of NIfTI volumes for tests and benchmarks (scripts-only code, not part of the package)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def crop_slices(src: Path, dst: Path, k0: int, k1: int) -> Path:
    """Keep voxel slices k0..k1-1 along axis 2; the affine moves so every voxel keeps its place in the
    world, and the qform/sform codes stay the source's (1, scanner, where it had none)."""
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)[:, :, k0:k1]
    shift = np.eye(4)
    shift[2, 3] = k0
    aff = img.affine @ shift
    out = nib.Nifti1Image(data, aff, header=img.header.copy())
    out.set_qform(aff, code=int(img.header["qform_code"]) or 1)
    out.set_sform(aff, code=int(img.header["sform_code"]) or 1)
    nib.save(out, str(dst))
    return dst
