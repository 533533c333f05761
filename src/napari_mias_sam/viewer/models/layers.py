"""NIfTI volumes <-> napari layer data, with the geometry kept exact in both directions.

Pure numpy/nibabel: nothing here imports napari or Qt (``reader``, ``writer`` and ``widget``
are the thin napari-facing layers over it).

Conventions
-----------
* **Display order.** napari slides along data axis 0 and shows axes 1 and 2 as rows and columns.
  A NIfTI file's voxel axes are transposed (never resampled, never flipped) so that the axial
  axis comes first, then the axis closest to anterior-posterior (rows), then the one closest to
  left-right (columns). ``display_axes`` is that permutation: display axis ``a`` is file axis
  ``display_axes[a]``.
* **World frame.** napari's world coordinates are patient millimetres in DICOM/ITK LPS order
  reversed, ``(S, P, L)`` = (z, y, x) of LPS, as SimpleITK arrays are: the viewer then shows axial
  slices in radiological convention (anterior up, patient's right on the screen's left). The
  layer's 4x4 ``affine`` is ``WORLD_FROM_RAS @ nifti_affine @ permutation``, so oblique, flipped
  and anisotropic files, their ground truth and every output overlay exactly.
* **Metadata.** Each layer keeps the source ``affine`` (4x4 voxel -> RAS mm), the nibabel
  ``header``, the ``path`` and the ``display_axes`` in ``layer.metadata``; the writer and the
  widget rebuild the file-order :class:`~napari_mias_sam.data.volumes.Volume` from them, so a saved layer
  has the source geometry and the pipeline sees exactly what the command line sees.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ...core.errors import InputError
from ...method.preprocess import MRI_PERCENTILES, PREPROCESS_PRESETS
from ...data.datasets import case_for_file
from ...data.volumes import Volume, is_nifti, load_labels, load_volume, nifti_stem, save_nifti

__all__ = [
    "looks_like_ct",
    "ct_contrast_limits",
    "WORLD_FROM_RAS",
    "WORLD_AXIS_LABELS",
    "RAS_FROM_WORLD",
    "GEOMETRY_KEYS",
    "MAX_LABELS",
    "display_axes",
    "permutation_matrix",
    "layer_affine",
    "to_display",
    "from_display",
    "looks_like_segmentation",
    "geometry_metadata",
    "read_nifti_layers",
    "volume_from_layer",
    "nifti_from_layer",
    "write_layer",
]

#: RAS (x, y, z) millimetres -> napari world (S, P, L) millimetres.
WORLD_FROM_RAS = np.array(
    [[0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
RAS_FROM_WORLD = np.linalg.inv(WORLD_FROM_RAS)

#: Names of the world axes (S, P, L): the slices met moving along each, for the viewer's sliders.
WORLD_AXIS_LABELS = ("axial", "coronal", "sagittal")

#: Keys of ``layer.metadata`` that carry the source geometry.
GEOMETRY_KEYS = ("affine", "header", "path", "display_axes", "source_shape")

#: At most this many distinct integer values for an unnamed file to open as labels.
MAX_LABELS = 16

_SEG_NAME = re.compile(r"(_seg|_gt|label|mask)", re.IGNORECASE)


# -- axis order and transforms ------------------------------------------------------------------
def display_axes(affine: np.ndarray) -> tuple[int, int, int]:
    """File voxel axes in display order: axial first, then anterior-posterior, then left-right.

    Uses nibabel's orientation codes (each voxel axis is assigned its closest world axis, one
    each), so permuted and oblique files slice the way a radiologist expects.
    """
    codes = nib.aff2axcodes(np.asarray(affine, dtype=float))
    order = []
    for pair in ("SI", "AP", "LR"):
        hits = [i for i, c in enumerate(codes) if c is not None and c in pair]
        order.append(hits[0] if hits else None)
    if None in order or len(set(order)) != 3:  # degenerate affine: keep the file order
        return (0, 1, 2)
    return tuple(int(a) for a in order)  # type: ignore[return-value]


def permutation_matrix(axes: tuple[int, ...]) -> np.ndarray:
    """4x4 matrix mapping display voxel indices to file voxel indices."""
    p = np.zeros((4, 4))
    for a, f in enumerate(axes):
        p[f, a] = 1.0
    p[3, 3] = 1.0
    return p


def layer_affine(affine: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The napari layer affine (display voxel -> world (S, P, L) mm) of a NIfTI affine."""
    return WORLD_FROM_RAS @ np.asarray(affine, dtype=float) @ permutation_matrix(axes)


def to_display(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """File-order array -> display order (a view, no copy)."""
    return np.transpose(array, axes)


def from_display(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Display-order array -> file order (a view, no copy)."""
    return np.transpose(array, np.argsort(axes))


# -- reading ------------------------------------------------------------------------------------
def _integer_valued(a: np.ndarray) -> bool:
    if a.dtype.kind in "biu":
        return True
    if a.dtype.kind != "f" or not np.isfinite(a).all():
        return False
    return bool(np.all(a == np.rint(a)))


def looks_like_segmentation(path: str | os.PathLike, data: np.ndarray) -> bool:
    """Open as Labels? A segmentation-like name (``*_seg*``, ``*_gt*``, ``*label*``, ``*mask*``)
    with integer values, or unnamed integer data holding at most :data:`MAX_LABELS` values."""
    if data.size == 0 or not _integer_valued(data):
        return False
    if _SEG_NAME.search(nifti_stem(path)):
        return True
    # Cheap rejection on a strided sample before the exact count on the whole array.
    flat = data.reshape(-1)
    step = max(1, flat.size // 200_000)
    if np.unique(flat[::step]).size > MAX_LABELS:
        return False
    return np.unique(flat).size <= MAX_LABELS


def geometry_metadata(volume: Volume, axes: tuple[int, ...]) -> dict[str, Any]:
    """The ``layer.metadata`` entries that let the writer and the widget restore the file."""
    return {
        "affine": np.asarray(volume.affine, dtype=float),
        "header": volume.header,
        "path": str(volume.path) if volume.path is not None else None,
        "display_axes": tuple(int(a) for a in axes),
        "source_shape": tuple(int(s) for s in volume.shape),
    }


def _robust_limits(data: np.ndarray) -> list[float]:
    """Contrast limits: the foreground percentiles the MRI preset clips to (what the encoder sees)."""
    lo, hi = float(np.min(data)), float(np.max(data))
    fg = data[data > lo]
    if fg.size > 16:
        lo2, hi2 = (float(v) for v in np.percentile(fg[:: max(1, fg.size // 500_000)], MRI_PERCENTILES))
        if hi2 > lo2:
            return [min(lo, lo2), hi2]
    return [lo, hi if hi > lo else lo + 1.0]


def read_nifti_layers(path: str | os.PathLike, *, kind: str | None = None) -> list[tuple[np.ndarray, dict, str]]:
    """Read one NIfTI file as a napari ``LayerDataTuple`` list (one layer).

    ``kind``: ``"image"`` or ``"labels"`` to force the layer type (dataset readers know it);
    by default :func:`looks_like_segmentation` decides. CT images (Hounsfield units) open with
    the abdomen window instead of intensity percentiles; LiTS segmentations carry their lesion
    labels in the metadata.

    3D files (and 4D files with one volume) open in display order with a full affine; other
    dimensionalities open as-is with the voxel sizes as scale (MIAS-SAM itself needs 3D).
    Raises :class:`~napari_mias_sam.core.errors.InputError` with the file's name for bad files.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InputError(f"{path}: cannot read this NIfTI file ({type(exc).__name__}: {exc}).") from exc
    shape = tuple(img.shape)
    name = nifti_stem(path)
    raw = np.asarray(img.dataobj)
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        if kind == "labels" or (kind is None and looks_like_segmentation(path, raw)):
            vol = load_labels(path)
            kind = "labels"
        else:
            vol = load_volume(path, allow_nan=True)
            kind = "image"
        axes = display_axes(vol.affine)
        data = np.ascontiguousarray(to_display(vol.data, axes))
        kwargs: dict[str, Any] = {
            "name": name,
            "affine": layer_affine(vol.affine, axes),
            "metadata": geometry_metadata(vol, axes),
            "axis_labels": WORLD_AXIS_LABELS,
        }
        if kind == "image" and looks_like_ct(data, path):
            kwargs.update(colormap="gray", contrast_limits=ct_contrast_limits("abdomen"))
            kwargs["metadata"]["display_window"] = "ct-abdomen"
        elif kind == "image":
            kwargs.update(colormap="gray", contrast_limits=_robust_limits(data))
        else:
            kwargs.update(opacity=0.6)
            case = case_for_file(path)
            if case is not None and case.seg == path:
                lesion = case.info.lesion
                kwargs["metadata"].update(dataset=case.kind, subject=case.subject,
                                          lesion_labels=None if lesion is None else list(lesion))
        return [(data, kwargs, kind)]
    # 2D or a real 4D series: keep the file's axes, scale by the voxel sizes.
    zooms = [float(z) if z > 0 else 1.0 for z in img.header.get_zooms()[: len(shape)]]
    kind = "labels" if looks_like_segmentation(path, raw) else "image"
    data = raw if kind == "image" else raw.astype(np.int32)
    if kind == "image":
        data = np.asarray(img.get_fdata(dtype=np.float32))
    meta = {"affine": np.asarray(img.affine, dtype=float), "header": img.header, "path": str(path), "display_axes": None,
            "source_shape": shape}
    return [(data, {"name": name, "scale": zooms, "metadata": meta}, kind)]


# -- layers back to volumes ---------------------------------------------------------------------
def _has_geometry(data_shape: tuple[int, ...], metadata: dict | None) -> bool:
    if not metadata or metadata.get("affine") is None or metadata.get("display_axes") is None:
        return False
    axes = tuple(metadata["display_axes"])
    if len(axes) != 3 or len(data_shape) != 3:
        return False
    src = metadata.get("source_shape")
    return src is None or tuple(data_shape) == tuple(int(src[a]) for a in axes)


def volume_from_layer(
    data: np.ndarray,
    metadata: dict | None,
    data_to_world: np.ndarray | None = None,
    *,
    name: str = "volume",
    dtype: type | np.dtype | None = np.float32,
) -> tuple[Volume, tuple[int, int, int]]:
    """A file-order :class:`Volume` and the display axes of a 3D layer.

    With the geometry this module put in ``metadata`` the volume is the source file's voxels with
    its affine and header. Otherwise (a layer from another reader or made in napari) the layer's
    own data -> world transform ``data_to_world`` (4x4, world in (S, P, L) mm) gives the affine and
    the layer's axis order is kept (data axis 0 is then the axial axis).
    """
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise InputError(
            f"layer '{name}' has {arr.ndim} dimensions {tuple(arr.shape)}; MIAS-SAM segments 3D volumes. "
            "Open a 3D volume (a 4D series: pick one volume first)."
        )
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    md = metadata or {}
    if _has_geometry(arr.shape, md):
        axes = tuple(int(a) for a in md["display_axes"])
        path = md.get("path")
        vol = Volume(
            data=np.ascontiguousarray(from_display(arr, axes)),
            affine=np.asarray(md["affine"], dtype=float),
            header=md.get("header"),
            path=Path(path) if path else None,
        )
        return vol, axes  # type: ignore[return-value]
    d2w = np.eye(4) if data_to_world is None else np.asarray(data_to_world, dtype=float)
    vol = Volume(data=np.ascontiguousarray(arr), affine=RAS_FROM_WORLD @ d2w, header=None, path=None)
    return vol, (0, 1, 2)


def _labels_dtype(arr: np.ndarray) -> np.dtype:
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for dt in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def nifti_from_layer(data: np.ndarray, metadata: dict | None, data_to_world: np.ndarray | None = None, *, labels: bool = False) -> tuple[np.ndarray, Volume]:
    """File-order array and a reference :class:`Volume` (affine + header) for saving a layer."""
    arr = np.asarray(data)
    if labels:
        arr = arr.astype(_labels_dtype(arr), copy=False)
    elif arr.dtype.kind not in "f" or arr.dtype.itemsize > 4:
        arr = arr.astype(np.float32)
    md = metadata or {}
    if arr.ndim == 3:
        vol, _axes = volume_from_layer(arr, md, data_to_world, dtype=None)
        return vol.data, Volume(data=vol.data, affine=vol.affine, header=vol.header if _has_geometry(arr.shape, md) else None)
    # Other dimensionalities: keep the array as it is; the source affine when the shape matches.
    src = md.get("source_shape")
    aff = np.asarray(md["affine"], float) if (md.get("affine") is not None and src is not None and tuple(src) == arr.shape) else np.eye(4)
    return arr, Volume(data=arr, affine=aff, header=None)


def write_layer(path: str | os.PathLike, data: np.ndarray, metadata: dict | None, data_to_world: np.ndarray | None = None, *, labels: bool = False) -> Path:
    """Save a layer as NIfTI with the source geometry (``.nii.gz`` is added to a bare name)."""
    path = Path(path)
    if not is_nifti(path):
        path = path.with_name(path.name + ".nii.gz")
    arr, ref = nifti_from_layer(data, metadata, data_to_world, labels=labels)
    like = ref if ref.header is not None else None
    return save_nifti(path, arr, like, affine=ref.affine, intent="label" if labels else None)


#: Display windows (HU) for CT images: the windows of the preprocessing's CT presets.
CT_WINDOWS = {name: PREPROCESS_PRESETS[f"ct-{name}"].window for name in ("abdomen", "liver")}


def looks_like_ct(data: np.ndarray, path: str | os.PathLike | None = None) -> bool:
    """A CT volume in Hounsfield units: a LiTS ``volume-N`` file, or values reaching air
    (at or below -500) and tissue/bone (at least 100), which MRI never holds."""
    if path is not None:
        case = case_for_file(path)
        if case is not None and case.kind == "lits" and Path(path) == case.images.get("ct"):
            return True
    if data.size == 0 or data.dtype.kind not in "iuf":
        return False
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    return lo <= -500.0 and hi >= 100.0


def ct_contrast_limits(preset: str = "abdomen") -> list[float]:
    if preset not in CT_WINDOWS:
        raise InputError(f"unknown CT window {preset!r}; choose {', '.join(CT_WINDOWS)}")
    return list(CT_WINDOWS[preset])
