"""A dataset case as napari layer data: every modality of a BraTS case folder as an Image layer
and its segmentation as Labels, or a LiTS ``volume-N`` with its ``segmentation-N``; all placed by
their affines (one grid, so they overlay exactly). CT volumes get a CT display window.

Pure numpy/nibabel (no napari, no Qt): ``viewer.reader`` is the napari-facing layer over it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ...data.datasets import MODALITIES, Case, check_case, find_cases, read_case_folder
from ...core.errors import InputError
from .layers import read_nifti_layers

__all__ = ["case_of_folder", "read_case_layers"]


def case_of_folder(folder: str | os.PathLike) -> Case | None:
    """The one case a folder holds (a BraTS case folder, or a folder with one LiTS pair), else None.
    A root of several cases raises :class:`InputError` saying to open one case."""
    folder = Path(folder)
    case = read_case_folder(folder)
    if case is not None:
        return case
    cases = find_cases(folder)
    if len(cases) == 1:
        return cases[0]
    raise InputError(f"{folder}: is a dataset root with {len(cases)} cases; open one case folder (or one volume-N "
                     "file), or build a memory bank from the root in the MIAS-SAM widget.")


def read_case_layers(case: Case) -> list[tuple[np.ndarray, dict, str]]:
    """Layer data tuples of a case: one Image per modality (canonical order), then the
    segmentation as Labels, with the case's layout and lesion labels in the metadata."""
    check_case(case)  # one grid for every file, or a one-line error naming the odd one
    layers: list[tuple[np.ndarray, dict, str]] = []
    for mod in MODALITIES:
        path = case.images.get(mod)
        if path is None:
            continue
        data, kwargs, _ = read_nifti_layers(path, kind="image")[0]
        kwargs["metadata"].update(dataset=case.kind, subject=case.subject, modality=mod)
        layers.append((data, kwargs, "image"))
    if case.seg is not None:
        data, kwargs, _ = read_nifti_layers(case.seg, kind="labels")[0]
        kwargs["metadata"].update(dataset=case.kind, subject=case.subject, lesion_labels=_json(case.info.lesion))
        layers.append((data, kwargs, "labels"))
    return layers


def _json(lesion) -> Any:
    return None if lesion is None else [int(v) for v in lesion]
