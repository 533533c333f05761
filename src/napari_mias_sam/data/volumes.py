"""NIfTI volumes in and out with their geometry, BMAD-style PNG slice folders, atomic saves."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
import nibabel as nib
import numpy as np

from ..core.errors import InputError
from .checks import check_affine, check_labels, check_voxel_dtype
from ..core.atomic_outputs import atomic_path, atomic_write_text

__all__ = [
    "NIFTI_SUFFIXES",
    "Volume",
    "is_nifti",
    "nifti_stem",
    "load_volume",
    "load_labels",
    "check_same_grid",
    "save_nifti",
    "atomic_path",
    "atomic_write_text",
    "find_volumes",
    "read_png_files",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A 3D volume with the geometry of the file it came from.

    ``data`` is float32 (images) or an integer array (labels) in the file's voxel order;
    ``affine`` maps voxel indices (i, j, k) to world millimetres; ``header`` is the source
    NIfTI header, kept so that outputs carry the same geometry and units.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: Path | None = None
    meta: dict = field(default_factory=dict)
    #: Several co-registered sequences of one case (C, X, Y, Z) float32 that go into the encoder's
    #: channels (a multi-sequence bank), ``data`` being the first; ``None``: ``data`` alone.
    channels: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def name(self) -> str:
        return nifti_stem(self.path) if self.path is not None else "volume"


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """``case_01.nii.gz`` -> ``case_01``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _read_nifti(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Open and fully read a NIfTI file; return the image and its data as float32."""
    if not path.exists():
        raise InputError(f"{path}: no such file. Check the path and try again.")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a NIfTI file (.nii or .nii.gz).")
    if not is_nifti(path):
        raise InputError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz).")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(f"{path}: not a NIfTI-1/NIfTI-2 image ({type(img).__name__}).")
        check_voxel_dtype(img.get_data_dtype(), path)
        check_affine(img.affine, path)
        # Read the data now, so truncated or corrupt files fail here with the file's name.
        data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    except InputError:
        raise
    except Exception as exc:  # nibabel raises many types for damaged files
        raise InputError(
            f"{path}: cannot read this NIfTI file ({type(exc).__name__}: {exc}). "
            "It may be truncated or corrupt; re-export or re-download it."
        ) from exc
    return img, data


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        hint = (
            "Pick one volume of the series (e.g. with fslroi or nibabel) and save it as its own file."
            if data.ndim > 3
            else "MIAS-SAM segments 3D volumes; stack 2D slices into a volume first, or use a BMAD slice folder."
        )
        raise InputError(f"{path}: has {data.ndim} dimensions {tuple(data.shape)}, expected a 3D volume. {hint}")
    if min(data.shape) < 1:
        raise InputError(f"{path}: empty volume of shape {tuple(data.shape)}.")
    return data


def load_volume(path: str | os.PathLike, *, allow_nan: bool = False) -> Volume:
    """Read a 3D NIfTI image as float32 with its affine and header.

    Raises :class:`InputError` for missing, corrupt or truncated files, for arrays that are not
    3D, and (unless ``allow_nan``) for volumes containing NaN or infinite values.
    """
    path = Path(path)
    img, data = _read_nifti(path)
    data = _as_3d(data, path)
    bad = ~np.isfinite(data)
    if bad.any() and not allow_nan:
        raise InputError(
            f"{path}: {int(bad.sum())} voxels are NaN or infinite. Replace them (e.g. with 0 or the "
            "background value) before running MIAS-SAM."
        )
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path)


def load_labels(path: str | os.PathLike, like: Volume | None = None) -> Volume:
    """Read a label/ground-truth NIfTI as an integer array; check its grid against ``like``."""
    path = Path(path)
    img, _ = _read_nifti(path)
    raw = _as_3d(np.asarray(img.dataobj), path)
    if np.issubdtype(raw.dtype, np.floating):
        if not np.isfinite(raw).all():
            raise InputError(f"{path}: ground truth contains NaN or infinite values.")
        rounded = np.rint(raw)
        if not np.allclose(raw, rounded, atol=1e-3):
            raise InputError(
                f"{path}: ground truth holds non-integer values; expected a label map (0 = background)."
            )
        raw = rounded
    labels = raw.astype(np.int32)
    check_labels(labels, path)
    vol = Volume(data=labels, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path)
    if like is not None:
        check_same_grid(vol, like)
    return vol


def check_same_grid(labels: Volume, image: Volume, *, atol: float = 1e-3) -> None:
    """Raise :class:`InputError` unless ``labels`` lies on the same voxel grid as ``image``."""
    lp = labels.path or "ground truth"
    ip = image.path or "image"
    if labels.shape != image.shape:
        raise InputError(
            f"{lp}: shape {labels.shape} differs from the image {ip} {image.shape}. "
            "The ground truth must be on the image's voxel grid (resample it first)."
        )
    if not np.allclose(labels.affine, image.affine, atol=atol):
        raise InputError(
            f"{lp}: affine differs from the image {ip} (max difference "
            f"{np.abs(labels.affine - image.affine).max():.4g} mm). The ground truth must share the "
            "image's geometry; resample or re-save it with the image's header."
        )


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    like: Volume | None = None,
    *,
    affine: np.ndarray | None = None,
    dtype: np.dtype | type | None = None,
    intent: str | None = None,
) -> Path:
    """Write ``array`` as NIfTI with the geometry of ``like`` (affine, qform/sform, units); atomic."""
    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"{path}: output name must end in .nii or .nii.gz")
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype)
    if like is not None and arr.shape[:3] != like.shape:
        raise InputError(f"{path}: array shape {arr.shape} does not match the reference volume {like.shape}")
    aff = affine if affine is not None else (like.affine if like is not None else np.eye(4))
    header = like.header.copy() if (like is not None and like.header is not None) else None
    img = nib.Nifti1Image(arr, aff, header=header)
    img.set_data_dtype(arr.dtype)
    if header is not None:
        # Keep the source's qform/sform codes so viewers place the output where the input is.
        qcode = int(header["qform_code"]) or 1
        scode = int(header["sform_code"]) or 1
        img.set_qform(aff, code=qcode)
        img.set_sform(aff, code=scode)
    img.header["scl_slope"] = np.nan  # the data are stored as-is, never rescaled
    img.header["scl_inter"] = np.nan
    if intent:
        img.header.set_intent(intent)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def find_volumes(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a sorted list of NIfTI files; error if none are found."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if q.is_file() and is_nifti(q))
            if not files:
                raise InputError(f"{p}: folder holds no .nii or .nii.gz files.")
            found.extend(files)
        elif p.exists():
            if not is_nifti(p):
                raise InputError(f"{p}: not a NIfTI file (expected .nii or .nii.gz).")
            found.append(p)
        else:
            raise InputError(f"{p}: no such file or folder.")
    return found


def read_png_files(files: list[Path], *, as_mask: bool = False) -> list[np.ndarray]:
    """Read PNG files as 2D float32 grey levels in [0, 1] (or boolean masks with ``as_mask``)."""
    from PIL import Image

    arrays: list[np.ndarray] = []
    for f in files:
        try:
            with Image.open(f) as im:
                a = np.asarray(im)
        except Exception as exc:
            raise InputError(f"{f}: cannot read this PNG ({exc}).") from exc
        if a.ndim == 3:
            a = a[..., :3].mean(axis=2) if a.shape[2] >= 3 else a[..., 0]
        if as_mask:
            arrays.append(a > 0)
        else:
            a = a.astype(np.float32)
            top = 65535.0 if a.max() > 255 else 255.0
            arrays.append(np.clip(a / top, 0.0, 1.0))
    return arrays
