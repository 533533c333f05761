"""A memory bank from the user's files: NIfTI volumes or folders, or BMAD-style PNG slice folders
(what ``mias-sam build-bank FILES`` and the widget's Build run)."""

from __future__ import annotations

import os
from pathlib import Path

from ..core import defaults
from ..bank import MemoryBank, build_bank
from ..method.preprocess import Preprocessing, resolve_axis
from ..method.reference_encoding import encoding_of
from ..core.errors import InputError
from ..core.records import to_dict
from ..pipeline.embedding_cache import EmbeddingCache, cached_encoder
from ..pipeline.frames import PNG_PREPROCESSING, normal_groups
from ..core.progress import CancelFn, ProgressFn

__all__ = ["build_bank_from_files", "check_bank_out"]


AXIS_NAMES = {0: "0", 1: "1", 2: "2"}


def build_bank_from_files(
    inputs: list[str | os.PathLike],
    backbone,
    *,
    preprocessing: Preprocessing,
    axis: int | str = defaults.SLICE_AXIS,
    layout: str = defaults.PATCH_LAYOUT,
    index_type: str = defaults.INDEX_TYPE,
    batch_size: int = defaults.BATCH_SIZE,
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


def check_bank_out(out: str | os.PathLike, inputs: list[str | os.PathLike]) -> None:
    """Refuse a bank folder that is one of the input folders or lies inside one (a dataset root,
    a case folder, a folder of normal volumes): the bank would be written into the user's data."""
    from ..data.datasets import looks_like_dataset

    target = Path(out).resolve()
    for n in inputs:
        src = Path(n).resolve()
        if target == src:
            raise InputError(f"{out}: the bank folder cannot be an input folder.")
        if src.is_dir() and target.is_relative_to(src):
            what = "dataset" if looks_like_dataset(src) else "input folder"
            raise InputError(f"{out}: the bank folder lies inside the {what} {n}; write it outside (e.g. "
                             f"{src.parent / ('bank-' + src.name)}) so the {what} stays as it was.")
