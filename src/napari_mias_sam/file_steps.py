"""The steps the CLI and the widget share: build a bank from files, write a run's outputs."""

from __future__ import annotations

import contextlib
import csv
import io as _io
import os
from pathlib import Path

from .bank import MemoryBank, build_bank
from .cache import EmbeddingCache, cached_encoder
from .errors import InputError
from .io import atomic_path, is_nifti, save_nifti
from .pipeline import ProgressFn, CancelFn, SegmentationResult
from .preprocess import resolve_axis
from .reference_io import encoding_of
from .settings import Preprocessing, to_dict
from .model_inputs import PNG_PREPROCESSING, normal_groups

__all__ = ["build_bank_from_files", "output_paths", "check_outputs", "write_outputs"]

AXIS_NAMES = {0: "0", 1: "1", 2: "2"}


def build_bank_from_files(
    inputs: list[str | os.PathLike],
    backbone,
    *,
    preprocessing: Preprocessing,
    axis: int | str = "axial",
    layout: str = "paper1024",
    index_type: str = "flat",
    batch_size: int = 4,
    coreset_ratio: float | None = None,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
    cache: EmbeddingCache | None = None,
) -> MemoryBank:
    """Build a memory bank from NIfTI volumes/folders or BMAD-style PNG slice folders.

    ``cache``: read and store the slices' embeddings there, so that another bank from the same
    volumes (another layout, index type or coreset) skips the encoder."""
    groups, kind = normal_groups(list(inputs), preprocessing, axis, encoding=encoding_of(backbone))
    prep = PNG_PREPROCESSING if kind == "png" else to_dict(preprocessing)
    axis_name = axis if isinstance(axis, str) and not axis.isdigit() else AXIS_NAMES[resolve_axis(axis)]
    return build_bank(
        groups, backbone, layout=layout, preprocessing=prep, slice_axis=axis_name, index_type=index_type,
        batch_size=batch_size, coreset_ratio=coreset_ratio, progress=progress, cancelled=cancelled,
        embed=cached_encoder(backbone, cache) if cache is not None else None,
    )


def output_paths(out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {
        "mask": out / f"{stem}_mask.nii.gz",
        "anomaly": out / f"{stem}_anomaly.nii.gz",
        "points": out / f"{stem}_points.csv",
    }


def check_outputs(paths: dict[str, Path], inputs: list[Path], *, overwrite: bool = False) -> None:
    """Refuse outputs that would overwrite an input, or existing files unless ``overwrite``."""
    resolved_inputs = {Path(p).resolve() for p in inputs if p is not None}
    for p in paths.values():
        if p.resolve() in resolved_inputs:
            raise InputError(f"{p}: output would overwrite an input file; choose another --out folder.")
        if p.exists() and not overwrite:
            raise InputError(f"{p}: already exists; choose another --out folder or pass --overwrite.")


def write_outputs(result: SegmentationResult, out_dir: str | os.PathLike, *, stem: str | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write ``<stem>_mask.nii.gz`` (uint8), ``<stem>_anomaly.nii.gz`` (float32) and
    ``<stem>_points.csv`` with the input's geometry. Each file is written atomically."""
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
    # A run's outputs are a set: all three are written to temporary files first and only then
    # renamed into place, so a failure never leaves half of them (nor loses earlier ones).
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_path(p)) for k, p in paths.items()}
        save_nifti(tmp["mask"], mask, result.volume, dtype="uint8", intent="label")
        save_nifti(tmp["anomaly"], amap, result.volume, dtype="float32")
        tmp["points"].write_text(buf.getvalue(), encoding="utf-8")
    return paths
