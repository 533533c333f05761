"""A run's outputs, as the CLI and the widget write them: the output names of a volume, their
checks before any work, and the atomic write of mask, anomaly map and points table."""

from __future__ import annotations

import contextlib
import csv
import io as _io
import os
from pathlib import Path

from ..core.atomic_outputs import OutputSet
from ..core.errors import InputError
from ..data.volumes import is_nifti, save_nifti
from ..pipeline.segment import SegmentationResult

__all__ = ["output_paths", "segment_outputs", "check_outputs", "write_outputs", "write_output_files", "volume_report"]

def output_paths(out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {
        "mask": out / f"{stem}_mask.nii.gz",
        "anomaly": out / f"{stem}_anomaly.nii.gz",
        "points": out / f"{stem}_points.csv",
    }


def segment_outputs(out_dir: str | os.PathLike, stem: str, inputs: list = (), *, overwrite: bool = False) -> OutputSet:
    """The (unclaimed) output set of one segmented volume: its three files, under one lock per stem."""
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


def write_outputs(result: SegmentationResult, out_dir: str | os.PathLike, *, stem: str | None = None, overwrite: bool = False,
                  claim: OutputSet | None = None) -> dict[str, Path]:
    """Write ``<stem>_mask.nii.gz`` (uint8), ``<stem>_anomaly.nii.gz`` (float32) and
    ``<stem>_points.csv`` with the input's geometry. The three are claimed as a set (``claim``, or
    claimed here), written to temporary files and only then moved into place together: a failure
    or a kill never leaves half of them, and two runs never both write the same names."""
    stem = stem or result.volume.name
    paths = output_paths(out_dir, stem)
    inputs = [result.volume.path] if result.volume.path else []
    check_outputs(paths, inputs, overwrite=overwrite)
    for p in paths.values():
        if not (is_nifti(p) or p.suffix == ".csv"):
            raise InputError(f"{p}: unexpected output name")
    with contextlib.ExitStack() as stack:
        outs = claim if claim is not None else stack.enter_context(segment_outputs(out_dir, stem, inputs, overwrite=overwrite))
        write_output_files(result, {key: outs.temp(p.name) for key, p in paths.items()})
        outs.commit()
    return paths


def write_output_files(result: SegmentationResult, files: dict[str, Path]) -> None:
    """Write the mask (uint8), the anomaly map (float32) and the points table of ``result`` to the
    given (temporary) files ``files["mask"]``, ``["anomaly"]``, ``["points"]``; the caller moves
    them into place (:class:`~napari_mias_sam.core.atomic_outputs.OutputSet`)."""
    rows = result.points_rows()
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["slice"])
    writer.writeheader()
    writer.writerows(rows)
    save_nifti(files["mask"], result.mask_volume(), result.volume, dtype="uint8", intent="label")
    save_nifti(files["anomaly"], result.anomaly_volume(), result.volume, dtype="float32")
    Path(files["points"]).write_text(buf.getvalue(), encoding="utf-8")


def volume_report(job, result: SegmentationResult, gt) -> dict:
    """``segment``'s report of one volume (``job``: a :class:`~napari_mias_sam.jobs.dataset_runs.SegmentInput`):
    settings and timings, and with ground truth its lesion labels and metrics (the caller adds
    ``outputs`` and ``seconds``)."""
    from ..data.datasets import lesion_description, lesion_mask
    from ..evaluation.scoring import gt_metrics

    rep = {"volume": str(job.image), "settings": result.metadata()["settings"],
           "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}
    if gt is not None:
        rep["ground_truth"] = str(job.gt)
        rep["lesion_labels"] = lesion_description(job.lesion, gt.data, source=job.lesion_source)
        if job.roi:
            rep["roi"] = f"{job.roi} (masked with the ground truth's labels, as the bank was built)"
        rep["metrics"] = gt_metrics(result, lesion_mask(gt.data, job.lesion))
    return rep
