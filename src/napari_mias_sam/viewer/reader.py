"""napari reader for NIfTI volumes (``*.nii``, ``*.nii.gz``) and dataset cases: images as Image
layers, ground truth and masks as Labels, every layer placed by its affine so that they overlay
exactly. A BraTS case folder (or a folder holding one LiTS pair) opens as one Image per modality
plus its seg as Labels; a LiTS ``volume-N`` opens with a CT window and its ``segmentation-N`` as
Labels scored with label 2 (select both files to open the pair). A prompt review saved by the
widget (``<stem>_qa.csv``, or the results folder holding it with the mask and the anomaly map)
opens as the reviewed CoG points (and those layers); running MIAS-SAM on that volume applies it.

The work is done by :func:`napari_mias_sam.viewer.models.layers.read_nifti_layers` and
:mod:`napari_mias_sam.viewer.models.case_layers`; see those modules for the axis order, the world frame
and the metadata kept for the writer and the widget.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..data.datasets import looks_like_dataset
from ..data.volumes import is_nifti
from .models.case_layers import case_of_folder, read_case_layers
from .models.layers import read_nifti_layers
from ..data.qa_table import QA_SUFFIX, is_results_folder

__all__ = ["napari_get_reader", "read_nifti"]


def _is_qa(p) -> bool:
    return str(p).endswith(QA_SUFFIX)


def napari_get_reader(path: str | os.PathLike | list) -> Callable | None:
    """Return :func:`read_nifti` when every path is a NIfTI file name or a dataset folder (a
    BraTS case, a LiTS pair, or a root of them: the reader then says to open one case)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        return None
    if not all(is_nifti(p) or _is_qa(p) or is_results_folder(p) or looks_like_dataset(p) for p in paths):
        return None
    return read_nifti


def read_nifti(path: str | os.PathLike | list) -> list[tuple]:
    """Read NIfTI files (one layer each) and case folders (one layer per file of the case)."""
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    layers: list[tuple] = []
    for p in paths:
        if _is_qa(p) or is_results_folder(p):
            from .models.review import qa_points_layer, results_folder_layers  # the pipeline's imports: only when needed

            layers.extend([qa_points_layer(p)] if _is_qa(p) else results_folder_layers(p))
        else:
            layers.extend(read_case_layers(case_of_folder(p)) if p.is_dir() else read_nifti_layers(p))
    if not _layers_take_axis_labels():  # napari < 0.6: the sliders keep their numbers
        layers = [(data, {k: v for k, v in kw.items() if k != "axis_labels"}, kind) for data, kw, kind in layers]
    return layers


def _layers_take_axis_labels() -> bool:
    import inspect

    from napari.layers import Image

    return "axis_labels" in inspect.signature(Image.__init__).parameters
