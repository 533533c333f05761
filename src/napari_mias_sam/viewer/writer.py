"""napari writers: Labels and Image layers to NIfTI with the source file's geometry.

A layer read by this plugin (or made by the MIAS-SAM widget) carries the source affine, header
and axis order in its metadata, and is written back in the file's voxel order with that affine
and header. The CoG Points layer of a run is written as its review, ``<stem>_qa.csv``
(:mod:`napari_mias_sam.data.qa_table`); other Points layers as napari's own CSV. Any other 3D layer is written in its own axis order with the affine of its napari
transform (world (S, P, L) mm mapped back to RAS).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .models.layers import write_layer

__all__ = ["write_labels", "write_image", "write_points", "layer_data_to_world"]


def _data_to_world(meta: dict[str, Any], ndim: int) -> np.ndarray | None:
    """The layer's full data -> world matrix from its state (affine o scale/translate/rotate/shear)."""
    if ndim != 3:
        return None
    from napari.utils.transforms import Affine

    base = Affine(
        scale=meta.get("scale", (1.0,) * ndim),
        translate=meta.get("translate", (0.0,) * ndim),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=ndim,
    )
    extra = meta.get("affine")
    extra_m = getattr(extra, "affine_matrix", None) if extra is not None else None
    if extra_m is None and extra is not None:
        extra_m = np.asarray(extra, dtype=float)
    m = base.affine_matrix
    return m if extra_m is None else np.asarray(extra_m, dtype=float) @ m


def layer_data_to_world(layer) -> np.ndarray | None:
    """The 4x4 data -> world matrix of a 3D napari layer (its affine after scale/translate/...)."""
    meta = {"scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate, "shear": layer.shear,
            "affine": layer.affine.affine_matrix}
    return _data_to_world(meta, layer.ndim)


def _write(path: str, data: Any, meta: dict, *, labels: bool) -> list[str]:
    arr = np.asarray(data)
    out = write_layer(path, arr, meta.get("metadata"), _data_to_world(meta, arr.ndim), labels=labels)
    return [str(out)]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as an integer NIfTI (uint8 when the labels fit)."""
    return _write(path, data, meta, labels=True)


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Write an Image layer as a float32 NIfTI."""
    if meta.get("rgb"):
        from ..core.errors import InputError

        raise InputError("RGB layers cannot be saved as NIfTI volumes; save a single-channel layer.")
    return _write(path, data, meta, labels=False)


def write_points(path: str, data: Any, meta: dict) -> list[str]:
    """A MIAS-SAM CoG layer: its review as ``<name>_qa.csv`` (``_qa`` added to a name without it),
    written atomically. Any other Points layer: napari's own points CSV."""
    from ..core.atomic_outputs import atomic_write_text
    from ..data.qa_table import QA_SUFFIX, qa_csv_text
    from .models.review import QA_KEY

    info = (meta.get("metadata") or {}).get("mias_sam") or {}
    rows = info.get(QA_KEY)
    if not rows:
        from napari_builtins.io import napari_write_points

        out = napari_write_points(path, data, meta)
        return [out] if out else []
    target = str(path)
    if not target.endswith(QA_SUFFIX):
        target = (target[: -len(".csv")] if target.endswith(".csv") else target) + QA_SUFFIX
    atomic_write_text(target, qa_csv_text(rows))
    return [target]
