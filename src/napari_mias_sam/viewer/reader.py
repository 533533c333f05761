"""napari reader for NIfTI volumes (``*.nii``, ``*.nii.gz``): images as Image layers, ground truth
and masks as Labels, every layer placed by its affine so that they overlay exactly.

The work is done by :func:`napari_mias_sam.viewer.layers.read_nifti_layers`; see that module for
the axis order, the world frame and the metadata kept for the writer and the widget.
"""

from __future__ import annotations

import os
from typing import Callable

from ..io import is_nifti
from .layers import read_nifti_layers

__all__ = ["napari_get_reader", "read_nifti"]


def napari_get_reader(path: str | os.PathLike | list) -> Callable | None:
    """Return :func:`read_nifti` when every path is a NIfTI file name, else ``None``."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(isinstance(p, (str, os.PathLike)) and is_nifti(p) for p in paths):
        return None
    return read_nifti


def read_nifti(path: str | os.PathLike | list) -> list[tuple]:
    """Read one or several NIfTI files; one layer per file."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    layers: list[tuple] = []
    for p in paths:
        layers.extend(read_nifti_layers(p))
    if not _layers_take_axis_labels():  # napari < 0.6: the sliders keep their numbers
        layers = [(data, {k: v for k, v in kw.items() if k != "axis_labels"}, kind) for data, kw, kind in layers]
    return layers


def _layers_take_axis_labels() -> bool:
    import inspect

    from napari.layers import Image

    return "axis_labels" in inspect.signature(Image.__init__).parameters
