"""Intensity presets, slicing along an axis, and the square 256 x 256 'model frame'.

Every backbone sees each slice the way the reference code prepares it: intensities in [0, 1],
zero-padded at the bottom/right to a square, resized to 256 x 256. Anomaly maps, prompts and
masks all live in that frame; :class:`Frame` maps them back to the slice's own pixel grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import InputError

__all__ = [
    "Preprocessing",
    "PREPROCESS_PRESETS",
    "MRI_PERCENTILES",
    "CT_ABDOMEN_WINDOW",
    "SLICE_AXES",
    "FRAME",
    "Frame",
    "check_intensities",
    "normalise_intensities",
    "resolve_axis",
    "volume_slices",
    "foreground_slices",
    "to_frame",
    "from_frame",
]

FRAME = 256  # side of the square model frame (pixels)
#: Slice axes by name (voxel axes of a RAS-oriented volume).
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
#: MRI: intensities clipped to these percentiles of the foreground (voxels above the minimum).
MRI_PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: CT: the abdomen window (Hounsfield units), the ``ct`` mode's default and LiTS's preset.
CT_ABDOMEN_WINDOW: tuple[float, float] = (-200.0, 250.0)


@dataclass(frozen=True)
class Preprocessing:
    """How raw voxel values become the [0, 1] image the encoder sees.

    ``mode``: ``"mri"`` clips to percentiles of the foreground (voxels above the volume minimum),
    ``"ct"`` clips to a Hounsfield window, ``"minmax"`` rescales the raw range.
    ``scope``: ``"volume"`` computes the statistics once per volume (default), ``"slice"`` per
    slice (what BMAD's PNGs did when they were saved).
    """

    mode: Literal["mri", "ct", "minmax"] = "mri"
    percentiles: tuple[float, float] = MRI_PERCENTILES
    window: tuple[float, float] = CT_ABDOMEN_WINDOW
    scope: Literal["volume", "slice"] = "volume"

    def describe(self) -> str:
        if self.mode == "mri":
            return f"mri: foreground percentiles {self.percentiles[0]}-{self.percentiles[1]} per {self.scope}"
        if self.mode == "ct":
            return f"ct: window [{self.window[0]:g}, {self.window[1]:g}] HU"
        return f"minmax per {self.scope}"


# Named presets offered by the CLI and the widget.
PREPROCESS_PRESETS: dict[str, Preprocessing] = {
    "mri": Preprocessing(mode="mri"),
    "ct-abdomen": Preprocessing(mode="ct", window=CT_ABDOMEN_WINDOW),
    "ct-liver": Preprocessing(mode="ct", window=(-100.0, 200.0)),
    "ct-brain": Preprocessing(mode="ct", window=(0.0, 80.0)),
    "minmax": Preprocessing(mode="minmax"),
    "minmax-slice": Preprocessing(mode="minmax", scope="slice"),
}


def check_intensities(data: np.ndarray, prep: Preprocessing, *, source: str = "volume") -> None:
    """What :func:`normalise_intensities` needs of ``data``, checked without normalising it: finite
    values, not every voxel the same, a CT window with lower < upper (an :class:`InputError` naming
    ``source`` otherwise)."""
    arr = np.asarray(data, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{source}: contains NaN or infinite values; replace them before preprocessing.")
    if np.ptp(arr) == 0:
        raise InputError(f"{source}: every voxel has the same value ({float(arr.flat[0]):g}); nothing to segment.")
    if prep.mode == "ct" and not prep.window[1] > prep.window[0]:
        raise InputError(f"CT window must have lower < upper, got {prep.window}")


def normalise_intensities(data: np.ndarray, prep: Preprocessing, *, source: str = "volume") -> np.ndarray:
    """Map raw voxel values to float32 in [0, 1] following ``prep``.

    With ``prep.scope == "slice"`` the statistics are taken per slice along the last axis of a
    (N, H, W) stack; otherwise over the whole array. A constant volume is an error; a constant
    slice becomes all zeros (it is skipped downstream).
    """
    arr = np.asarray(data, dtype=np.float32)
    check_intensities(arr, prep, source=source)
    if prep.mode == "ct":
        lo, hi = prep.window
        return ((np.clip(arr, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if prep.scope == "slice" and arr.ndim == 3:
        return np.stack([_normalise_one(s, prep) for s in arr]).astype(np.float32)
    return _normalise_one(arr, prep)


def _normalise_one(arr: np.ndarray, prep: Preprocessing) -> np.ndarray:
    lo_all, hi_all = float(arr.min()), float(arr.max())
    if hi_all == lo_all:
        return np.zeros_like(arr, dtype=np.float32)
    if prep.mode == "mri":
        fg = arr[arr > lo_all]
        if fg.size < 16:
            fg = arr.ravel()
        lo, hi = np.percentile(fg, prep.percentiles)
        if not hi > lo:
            lo, hi = lo_all, hi_all
    else:
        lo, hi = lo_all, hi_all
    return ((np.clip(arr, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def resolve_axis(axis: int | str, affine: np.ndarray | None = None) -> int:
    """The voxel axis to slice along: an int 0-2, or 'axial' / 'coronal' / 'sagittal'.

    Anatomical names use the affine's orientation (the voxel axis closest to S-I is axial),
    so oblique or permuted files still slice the way a radiologist expects.
    """
    if isinstance(axis, (int, np.integer)) or (isinstance(axis, str) and axis.isdigit()):
        a = int(axis)
        if a not in (0, 1, 2):
            raise InputError(f"slice axis must be 0, 1 or 2, got {a}")
        return a
    name = str(axis).lower()
    if name not in SLICE_AXES:
        raise InputError(f"slice axis must be 0, 1, 2, axial, coronal or sagittal, got {axis!r}")
    if affine is None:
        return SLICE_AXES[name]
    codes = nib.aff2axcodes(affine)
    wanted = {"sagittal": "LR", "coronal": "AP", "axial": "SI"}[name]
    for i, c in enumerate(codes):
        if c in wanted:
            return i
    return SLICE_AXES[name]


def volume_slices(data: np.ndarray, axis: int) -> np.ndarray:
    """(N, H, W) view of a 3D array with the slicing axis first."""
    return np.moveaxis(data, axis, 0)


def foreground_slices(slices: np.ndarray, *, min_fraction: float = 0.01) -> np.ndarray:
    """Boolean per slice: does it hold anatomy (not constant, enough non-background pixels)?"""
    n = slices.shape[0]
    flat = slices.reshape(n, -1)
    lo = flat.min(axis=1, keepdims=True)
    frac = (flat > lo + 1e-6).mean(axis=1)
    return (np.ptp(flat, axis=1) > 1e-6) & (frac >= min_fraction)


@dataclass(frozen=True)
class Frame:
    """Geometry of one slice inside the square model frame (bottom/right zero padding)."""

    height: int
    width: int
    size: int = FRAME

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def valid(self) -> tuple[int, int]:
        """Rows and columns of the frame covered by the slice (the rest is padding)."""
        return (max(1, round(self.height * self.scale)), max(1, round(self.width * self.scale)))

    def to_slice(self, row: float, col: float) -> tuple[float, float]:
        """Frame pixel coordinates -> slice pixel coordinates (pixel centres)."""
        s = self.scale
        return ((row + 0.5) / s - 0.5, (col + 0.5) / s - 0.5)

    def to_frame(self, row: float, col: float) -> tuple[float, float]:
        s = self.scale
        return ((row + 0.5) * s - 0.5, (col + 0.5) * s - 0.5)


def to_frame(slices: np.ndarray | torch.Tensor, size: int = FRAME, *, encoding: str = "standard") -> torch.Tensor:
    """(N, H, W) in [0, 1] -> (N, size, size) float32: pad bottom/right to square, then resize.

    ``encoding="reference"``: as the paper's code, 8-bit grey levels resized with PIL
    (:func:`napari_mias_sam.method.reference_encoding.reference_frames`)."""
    if encoding == "reference":
        from .reference_encoding import reference_frames

        return reference_frames(slices, size)
    t = torch.as_tensor(np.ascontiguousarray(slices) if isinstance(slices, np.ndarray) else slices)
    t = t.float()
    n, h, w = t.shape
    side = max(h, w)
    t = F.pad(t, (0, side - w, 0, side - h))
    if side != size:
        t = F.interpolate(t[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)[:, 0]
    return t.clamp_(0.0, 1.0)


def from_frame(frames: np.ndarray | torch.Tensor, frame: Frame, *, mode: str = "bilinear") -> np.ndarray:
    """(N, size, size) frame arrays -> (N, H, W) on the slice grid (crop padding, resize)."""
    t = torch.as_tensor(frames).float()
    vh, vw = frame.valid
    t = t[:, :vh, :vw]
    if (vh, vw) != (frame.height, frame.width):
        kw = {"align_corners": False} if mode == "bilinear" else {}
        t = F.interpolate(t[:, None], size=(frame.height, frame.width), mode=mode, **kw)[:, 0]
    return t.numpy()
