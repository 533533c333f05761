"""A run's outputs, as the CLI and the widget write them: the output names of a volume, their
checks before any work, and the atomic write of mask, anomaly map, points table and lesions
(``<stem>_lesions.nii.gz``: one id per lesion; ``<stem>_lesions.csv``: one row per lesion)."""

from __future__ import annotations

import contextlib
import csv
import io as _io
import os
from pathlib import Path

import numpy as np

from ..core.atomic_outputs import OutputSet
from ..core.errors import InputError
from ..data.volumes import is_nifti, save_nifti
from ..method.lesions import LESION_COLUMNS
from ..pipeline.lesion_set import LesionSet, result_lesions
from ..pipeline.segment import SegmentationResult

__all__ = ["output_paths", "segment_outputs", "check_outputs", "write_outputs"]

def output_paths(out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {
        "mask": out / f"{stem}_mask.nii.gz",
        "anomaly": out / f"{stem}_anomaly.nii.gz",
        "points": out / f"{stem}_points.csv",
        "lesions": out / f"{stem}_lesions.nii.gz",
        "lesions_table": out / f"{stem}_lesions.csv",
    }


def segment_outputs(out_dir: str | os.PathLike, stem: str, inputs: list = (), *, overwrite: bool = False) -> OutputSet:
    """The (unclaimed) output set of one segmented volume: its five files, under one lock per stem."""
    names = [p.name for p in output_paths(out_dir, stem).values()]
    return OutputSet(out_dir, names, overwrite=overwrite, inputs=inputs, lock_name=stem)


def check_outputs(paths: dict[str, Path], inputs: list[Path], *, overwrite: bool = False) -> None:
    """Refuse outputs that would overwrite an input, or existing files unless ``overwrite``."""
    resolved_inputs = {Path(p).resolve() for p in inputs if p is not None}
    for p in paths.values():
        if p.resolve() in resolved_inputs:
            raise InputError(f"{p}: output would overwrite an input file; choose another --out folder.")
        if p.exists() and not overwrite:
            raise InputError(f"{p}: already exists; choose another --out folder or pass --overwrite.")


def _csv_text(rows: list[dict], columns) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else list(columns))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(result: SegmentationResult, out_dir: str | os.PathLike, *, stem: str | None = None, overwrite: bool = False,
                  claim: OutputSet | None = None, lesions: LesionSet | None = None) -> dict[str, Path]:
    """Write ``<stem>_mask.nii.gz`` (uint8), ``<stem>_anomaly.nii.gz`` (float32),
    ``<stem>_points.csv``, ``<stem>_lesions.nii.gz`` (int32 lesion ids) and ``<stem>_lesions.csv``
    with the input's geometry. ``lesions``: the lesions to write (their mask is the mask written:
    a rejected lesion is in neither); by default the result's own, with the default rule. The
    files are claimed as a set (``claim``, or claimed here), written to temporary files and only
    then moved into place together: a failure or a kill never leaves part of them, and two runs
    never both write the same names."""
    stem = stem or result.volume.name
    paths = output_paths(out_dir, stem)
    inputs = [result.volume.path] if result.volume.path else []
    check_outputs(paths, inputs, overwrite=overwrite)
    for p in paths.values():
        if not (is_nifti(p) or p.suffix == ".csv"):
            raise InputError(f"{p}: unexpected output name")
    points_csv = _csv_text(result.points_rows(), ["slice"])
    if lesions is None:
        lesions = result_lesions(result)
    mask = lesions.mask.astype(np.uint8)
    amap = result.anomaly_volume()
    with contextlib.ExitStack() as stack:
        outs = claim if claim is not None else stack.enter_context(segment_outputs(out_dir, stem, inputs, overwrite=overwrite))
        save_nifti(outs.temp(paths["mask"].name), mask, result.volume, dtype="uint8", intent="label")
        save_nifti(outs.temp(paths["anomaly"].name), amap, result.volume, dtype="float32")
        outs.temp(paths["points"].name).write_text(points_csv, encoding="utf-8")
        save_nifti(outs.temp(paths["lesions"].name), lesions.labels, result.volume, dtype="int32", intent="label")
        outs.temp(paths["lesions_table"].name).write_text(_csv_text(lesions.rows(), LESION_COLUMNS), encoding="utf-8")
        outs.commit()
    return paths
