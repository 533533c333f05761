"""Lesions as objects: the 3D connected components of a mask, with ids, sizes, places and scores.

A final mask becomes a label volume (:func:`label_lesions`: one id per lesion, 0 background) and
one :class:`Lesion` per id (:func:`describe_lesions`): voxels, volume in mL from the affine, the
slice range along the slicing axis, the centroid in voxels and world millimetres, the peak and
mean anomaly score inside it and the prompts that made it. Pure numpy/scipy: the CLI, the widget
and the Python API call it on the arrays they have.

Rules (stated, configurable; defaults in :mod:`napari_mias_sam.core.defaults`: 26-connected, at
least 10 voxels):

* ``connectivity``: 6 (faces), 18 (faces and edges) or 26 (faces, edges and corners; BraTS's
  lesion-wise metrics use 26) neighbours join voxels into one lesion.
* ``min_voxels``: components smaller than this are not lesions (they stay in the mask, which is
  the method's output, but get no id). :func:`min_voxels_for_ml` turns a volume in mL into voxels.
* Ids run 1..n from the largest lesion to the smallest (ties: the one met first in C order), so
  id 1 is always the biggest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..core import defaults

__all__ = [
    "CONNECTIVITIES",
    "Lesion",
    "LesionRule",
    "lesion_structure",
    "min_voxels_for_ml",
    "label_lesions",
    "describe_lesions",
    "assign_prompts",
    "remove_lesions",
    "LESION_COLUMNS",
    "lesion_rows",
]

#: Neighbourhoods that may join voxels into one lesion, by neighbour count.
CONNECTIVITIES: tuple[int, ...] = (6, 18, 26)
#: The lesions table's columns (``<stem>_lesions.csv``), in order.
LESION_COLUMNS: tuple[str, ...] = (
    "id", "voxels", "volume_ml", "first_slice", "last_slice", "centroid_i", "centroid_j", "centroid_k",
    "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "peak_score", "mean_score", "n_prompts", "prompts", "review",
    "match",
)


@dataclass(frozen=True)
class LesionRule:
    """How a mask becomes lesions: the neighbourhood and the smallest lesion, in voxels."""

    connectivity: int = defaults.LESION_CONNECTIVITY
    min_voxels: int = defaults.MIN_LESION_VOXELS

    def __post_init__(self) -> None:
        if self.connectivity not in CONNECTIVITIES:
            raise ValueError(f"lesion connectivity must be one of {', '.join(map(str, CONNECTIVITIES))}, got {self.connectivity}")
        if int(self.min_voxels) < 1:
            raise ValueError(f"the minimum lesion size must be at least 1 voxel, got {self.min_voxels}")

    def describe(self) -> str:
        return f"3D connected components ({self.connectivity}-connected) of at least {self.min_voxels} voxels"


@dataclass
class Lesion:
    """One lesion of a label volume (see the module docstring for the fields' meaning)."""

    id: int
    voxels: int
    volume_ml: float
    slice_range: tuple[int, int]
    centroid_voxel: tuple[float, float, float]
    centroid_mm: tuple[float, float, float]
    peak_score: float | None = None
    mean_score: float | None = None
    prompts: list[str] = field(default_factory=list)
    review: str = ""  # "", "accepted" (rejected lesions leave the table and the files)
    match: str = ""  # against a ground truth: "matched" or "false positive" ("" without one)

    @property
    def centre_index(self) -> tuple[int, int, int]:
        """The centroid rounded to a voxel index (where the viewer jumps to)."""
        return tuple(int(round(c)) for c in self.centroid_voxel)  # type: ignore[return-value]


def lesion_structure(connectivity: int) -> np.ndarray:
    """The 3x3x3 neighbourhood of ``connectivity`` (6, 18 or 26)."""
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"lesion connectivity must be one of {', '.join(map(str, CONNECTIVITIES))}, got {connectivity}")
    return ndimage.generate_binary_structure(3, CONNECTIVITIES.index(connectivity) + 1)


def min_voxels_for_ml(volume_ml: float, affine: np.ndarray) -> int:
    """The smallest whole number of voxels of ``affine``'s size that holds ``volume_ml`` mL."""
    if volume_ml < 0:
        raise ValueError(f"a minimum lesion volume must be 0 mL or more, got {volume_ml:g}")
    voxel_mm3 = _voxel_mm3(affine)
    return max(1, math.ceil(volume_ml * 1000.0 / voxel_mm3 - 1e-9))


def _voxel_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))


def label_lesions(mask: np.ndarray, rule: LesionRule = LesionRule()) -> np.ndarray:
    """int32 label volume: one id per 3D connected component of ``mask`` of at least
    ``rule.min_voxels`` voxels, ids 1..n from the largest to the smallest, 0 elsewhere."""
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"lesions are found in a 3D mask, got shape {m.shape}")
    lab, n = ndimage.label(m != 0, structure=lesion_structure(rule.connectivity))
    out = np.zeros(m.shape, dtype=np.int32)
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= rule.min_voxels)
    if keep.size == 0:
        return out
    order = keep[np.argsort(-sizes[keep], kind="stable")]  # ndimage numbers components in C order: ties keep it
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[lab]


def describe_lesions(labels: np.ndarray, affine: np.ndarray, *, axis: int = 2, scores: np.ndarray | None = None,
                     prompts: dict[int, list[str]] | None = None) -> list[Lesion]:
    """One :class:`Lesion` per id of ``labels`` (ids 1..max; missing ids are skipped).

    ``scores``: the anomaly volume on the same grid (peak and mean per lesion); ``prompts``: the
    prompts of each lesion id (:func:`assign_prompts`); ``axis``: the slicing axis (slice range)."""
    lab = np.asarray(labels)
    ids = [int(i) for i in np.unique(lab) if i != 0]
    if not ids:
        return []
    aff = np.asarray(affine, dtype=float)
    voxel_ml = _voxel_mm3(aff) / 1000.0
    counts = ndimage.sum_labels(np.ones(lab.shape, dtype=np.float32), lab, index=ids)
    centres = ndimage.center_of_mass(np.ones(lab.shape, dtype=np.float32), lab, index=ids)
    boxes = ndimage.find_objects(lab)
    if scores is not None:
        sc = np.asarray(scores, dtype=np.float32)
        peaks = ndimage.maximum(sc, lab, index=ids)
        means = ndimage.mean(sc, lab, index=ids)
    out = []
    for n, i in enumerate(ids):
        box = boxes[i - 1]
        c = tuple(float(v) for v in centres[n])
        mm = tuple(float(v) for v in (aff @ np.array([*c, 1.0]))[:3])
        out.append(Lesion(
            id=i, voxels=int(counts[n]), volume_ml=float(counts[n]) * voxel_ml,
            slice_range=(int(box[axis].start), int(box[axis].stop - 1)),
            centroid_voxel=c, centroid_mm=mm,  # type: ignore[arg-type]
            peak_score=None if scores is None else float(peaks[n]),
            mean_score=None if scores is None else float(means[n]),
            prompts=list((prompts or {}).get(i, [])),
        ))
    return out


def assign_prompts(labels: np.ndarray, axis: int, centres: dict[int, list[tuple[str, tuple[float, float, float]]]]) -> dict[int, list[str]]:
    """Which prompts made which lesion: each prompt (slice ``s`` -> ``(kind, (i, j, k))`` voxel
    centres) goes to the lesion under its centre, else to the nearest lesion pixel of its slice
    (a box centre can fall in a ring-shaped lesion's hole); prompts on slices without a lesion go
    nowhere. Returns ``{id: ["slice:kind@i,j,k", ...]}``."""
    lab = np.asarray(labels)
    out: dict[int, list[str]] = {}
    for s in sorted(centres):
        sl = np.take(lab, s, axis=axis)
        if not sl.any():
            continue
        pix = None
        for kind, ijk in centres[s]:
            rest = [round(ijk[a]) for a in range(3) if a != axis]
            r = min(max(rest[0], 0), sl.shape[0] - 1)
            c = min(max(rest[1], 0), sl.shape[1] - 1)
            lid = int(sl[r, c])
            if lid == 0:
                if pix is None:
                    pix = np.argwhere(sl)
                near = pix[np.argmin(((pix - np.array([r, c])) ** 2).sum(1))]
                lid = int(sl[tuple(near)])
            out.setdefault(lid, []).append(f"{s}:{kind}@{ijk[0]:.1f},{ijk[1]:.1f},{ijk[2]:.1f}")
    return out


def remove_lesions(labels: np.ndarray, mask: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` and ``mask`` without the lesions ``ids`` (their voxels set to 0; the other ids
    keep their numbers, so a table and its files stay in step)."""
    lab = np.asarray(labels)
    gone = np.isin(lab, np.asarray(sorted({int(i) for i in ids}), dtype=lab.dtype))
    new_lab = np.where(gone, 0, lab).astype(lab.dtype)
    new_mask = np.where(gone, 0, np.asarray(mask)).astype(np.asarray(mask).dtype)
    return new_lab, new_mask


def _r(v: float | None, nd: int) -> float | str:
    return "" if v is None else round(float(v), nd)


def lesion_rows(lesions: list[Lesion]) -> list[dict]:
    """The rows of ``<stem>_lesions.csv`` (:data:`LESION_COLUMNS`)."""
    rows = []
    for les in lesions:
        ci, cj, ck = les.centroid_voxel
        x, y, z = les.centroid_mm
        rows.append(dict(zip(LESION_COLUMNS, (
            les.id, les.voxels, round(les.volume_ml, 4), les.slice_range[0], les.slice_range[1], round(ci, 2), round(cj, 2),
            round(ck, 2), round(x, 2), round(y, 2), round(z, 2), _r(les.peak_score, 4), _r(les.mean_score, 4),
            len(les.prompts), ";".join(les.prompts), les.review, les.match,
        ))))
    return rows
