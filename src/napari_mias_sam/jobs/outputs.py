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

__all__ = ["output_paths", "segment_outputs", "check_outputs", "write_outputs", "write_output_files", "volume_report",
           "segment_job"]

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
    with contextlib.ExitStack() as stack:
        outs = claim if claim is not None else stack.enter_context(segment_outputs(out_dir, stem, inputs, overwrite=overwrite))
        write_output_files(result, {key: outs.temp(p.name) for key, p in paths.items()}, lesions=lesions)
        outs.commit()
    return paths


def write_output_files(result: SegmentationResult, files: dict[str, Path], *, lesions: LesionSet | None = None) -> None:
    """Write the mask (uint8), the anomaly map (float32), the points table, the lesion ids (int32)
    and the lesions table of ``result`` to the given (temporary) files ``files["mask"]``,
    ``["anomaly"]``, ``["points"]``, ``["lesions"]``, ``["lesions_table"]``; the caller moves them
    into place (:class:`~napari_mias_sam.core.atomic_outputs.OutputSet`)."""
    points_csv = _csv_text(result.points_rows(), ["slice"])
    if lesions is None:
        lesions = result_lesions(result)
    save_nifti(files["mask"], lesions.mask.astype(np.uint8), result.volume, dtype="uint8", intent="label")
    save_nifti(files["anomaly"], result.anomaly_volume(), result.volume, dtype="float32")
    Path(files["points"]).write_text(points_csv, encoding="utf-8")
    save_nifti(files["lesions"], lesions.labels, result.volume, dtype="int32", intent="label")
    Path(files["lesions_table"]).write_text(_csv_text(lesions.rows(), LESION_COLUMNS), encoding="utf-8")


def volume_report(job, result: SegmentationResult, gt, *, lesions: LesionSet | None = None, lesionwise: dict | None = None) -> dict:
    """``segment``'s report of one volume (``job``: a :class:`~napari_mias_sam.jobs.dataset_runs.SegmentInput`):
    settings, timings, its lesions, and with ground truth its lesion labels and metrics (the caller
    adds ``outputs`` and ``seconds``)."""
    from ..data.datasets import lesion_description, lesion_mask
    from ..evaluation.lesionwise import LESIONWISE_SUMMARY_KEYS
    from ..evaluation.scoring import gt_metrics
    from .lesion_runs import lesion_report

    rep = {"volume": str(job.image), "settings": result.metadata()["settings"],
           "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}
    if lesions is not None:
        rep["lesions"] = lesion_report(lesions, lesionwise)
    if gt is not None:
        rep["ground_truth"] = str(job.gt)
        rep["lesion_labels"] = lesion_description(job.lesion, gt.data, source=job.lesion_source)
        if job.roi:
            rep["roi"] = f"{job.roi} (masked with the ground truth's labels, as the bank was built)"
        rep["metrics"] = gt_metrics(result, lesion_mask(gt.data, job.lesion))
        if lesionwise is not None:
            rep["metrics"]["lesionwise"] = {k: lesionwise[k] for k in LESIONWISE_SUMMARY_KEYS}
    return rep


def segment_job(job, segment, rule_args: tuple = (), *, files: dict[str, Path] | None = None,
                claim: OutputSet | None = None, out: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """One volume of ``segment`` after the run path's checks: ``segment()`` runs it (returns the
    result and its label volume: :func:`~napari_mias_sam.jobs.run.run` here, the same steps on a
    Dask worker), then its lesions (``rule_args``: connectivity, minimum voxels, minimum mL), its
    outputs (into ``out`` under ``claim``, or into the given temporary ``files`` that a caller
    elsewhere commits: a Dask worker) and its report, with ``outputs`` (``out`` only) and
    ``lesion_line`` (the console's line about its lesions)."""
    from ..data.checks import about
    from ..data.datasets import lesion_mask
    from .lesion_runs import lesion_line, lesion_rule, lesions_for

    with about(job.image):
        res, gt = segment()
        rule = lesion_rule(*rule_args, affine=res.volume.affine)
        lesions, lw = lesions_for(res, rule, None if gt is None else lesion_mask(gt.data, job.lesion))
        if files is not None:
            write_output_files(res, files, lesions=lesions)
            paths = None
        else:
            paths = write_outputs(res, out, overwrite=overwrite, claim=claim, lesions=lesions)
    rep = volume_report(job, res, gt, lesions=lesions, lesionwise=lw)
    head = {"volume": rep.pop("volume")}
    if paths is not None:
        head["outputs"] = {k: str(v) for k, v in paths.items()}
    return {**head, **rep, "lesion_line": lesion_line(lesions, lw)}
