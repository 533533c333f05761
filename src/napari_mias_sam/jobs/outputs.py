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

__all__ = ["output_paths", "segment_outputs", "check_outputs", "write_outputs"]

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
    rows = result.points_rows()
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["slice"])
    writer.writeheader()
    writer.writerows(rows)
    mask = result.mask_volume()
    amap = result.anomaly_volume()
    with contextlib.ExitStack() as stack:
        outs = claim if claim is not None else stack.enter_context(segment_outputs(out_dir, stem, inputs, overwrite=overwrite))
        save_nifti(outs.temp(paths["mask"].name), mask, result.volume, dtype="uint8", intent="label")
        save_nifti(outs.temp(paths["anomaly"].name), amap, result.volume, dtype="float32")
        outs.temp(paths["points"].name).write_text(buf.getvalue(), encoding="utf-8")
        outs.commit()
    return paths
