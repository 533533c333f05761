"""A memory bank from the user's files: NIfTI volumes or folders, or BMAD-style PNG slice folders
(what ``mias-sam build-bank FILES`` and the widget's Build run), and the one build step that every
bank source shares (:func:`build_bank_job`: streaming in this process, or staged: sharded and
resumable; ``napari_mias_sam.scale`` runs the same plan on Dask workers)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core import defaults
from ..bank import MemoryBank, SliceGroup, build_bank
from ..bank.build import make_plan
from ..method.preprocess import Preprocessing, resolve_axis
from ..method.reference_encoding import encoding_of
from ..core.errors import InputError
from ..core.records import to_dict
from ..pipeline.embedding_cache import EmbeddingCache, cached_encoder
from ..pipeline.frames import PNG_PREPROCESSING, normal_groups
from ..core.progress import CancelFn, ProgressFn
from ..data.sequences import parse_sequences
from ..method.preprocess import PREPROCESS_PRESETS
from .dataset_runs import dataset_groups, prepare_dataset

__all__ = ["build_bank_from_files", "BankInputs", "bank_inputs_from_files", "bank_inputs_from_dataset", "build_bank_from_dataset", "build_bank_job", "check_bank_out"]


AXIS_NAMES = {0: "0", 1: "1", 2: "2"}


@dataclass
class BankInputs:
    """What a bank is built from: its sources (one :class:`SliceGroup` each, loaded when their turn
    comes), the preprocessing and slice axis the manifest records, the manifest's ``dataset``
    entry (datasets only) and what else decides which slices a source gives (``context``: a staged
    source is reused only with the same)."""

    groups: list[SliceGroup]
    preprocessing: dict
    slice_axis: str
    dataset: dict | None = None
    context: dict = field(default_factory=dict)


def bank_inputs_from_files(inputs: list[str | os.PathLike], preprocessing: Preprocessing, *, axis: int | str = defaults.SLICE_AXIS,
                           encoding: str = "standard") -> BankInputs:
    """The sources of NIfTI volumes/folders or BMAD-style PNG slice folders."""
    groups, kind = normal_groups(list(inputs), preprocessing, axis, encoding=encoding)
    prep = PNG_PREPROCESSING if kind == "png" else to_dict(preprocessing)
    axis_name = axis if isinstance(axis, str) and not axis.isdigit() else AXIS_NAMES[resolve_axis(axis)]
    return BankInputs(groups, prep, axis_name, context={"kind": kind, "encoding": encoding})


def build_bank_job(
    inputs: BankInputs,
    backbone,
    *,
    layout: str = defaults.PATCH_LAYOUT,
    index_type: str = defaults.INDEX_TYPE,
    batch_size: int = defaults.BATCH_SIZE,
    coreset_ratio: float | None = None,
    shards: int = 1,
    staging: str | os.PathLike | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
    cache: EmbeddingCache | None = None,
    log=None,
) -> MemoryBank:
    """Build the bank of ``inputs`` with ``backbone`` in this process: streaming (the index in
    memory, nothing written before the end), or, with ``shards`` > 1 or ``resume``, staged in
    ``staging`` (:mod:`napari_mias_sam.bank.staging`: sharded, and resumable after an interruption).
    The caller saves the bank (and then removes ``staging``)."""
    embed = cached_encoder(backbone, cache) if cache is not None else None
    if shards > 1 or resume:
        from ..bank.staging import build_bank_staged
        import torch

        if staging is None:
            raise ValueError("a sharded or resumable build needs a staging folder")
        device = getattr(backbone, "device", None)
        plan = make_plan(inputs.groups, layout=layout, index_type=index_type, preprocessing=inputs.preprocessing,
                         slice_axis=inputs.slice_axis, batch_size=batch_size, coreset_ratio=coreset_ratio, shards=shards,
                         on_gpu=device is not None and torch.device(device).type == "cuda")
        bank = build_bank_staged(inputs.groups, plan, staging, backbone=backbone, embed=embed, resume=resume,
                                 context=inputs.context, progress=progress, cancelled=cancelled, log=log)
    else:
        bank = build_bank(inputs.groups, backbone, layout=layout, preprocessing=inputs.preprocessing, slice_axis=inputs.slice_axis,
                          index_type=index_type, batch_size=batch_size, coreset_ratio=coreset_ratio, progress=progress,
                          cancelled=cancelled, embed=embed)
    if inputs.dataset is not None:
        bank.manifest["dataset"] = inputs.dataset
    return bank


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
    src = bank_inputs_from_files(inputs, preprocessing, axis=axis, encoding=encoding_of(backbone))
    return build_bank_job(src, backbone, layout=layout, index_type=index_type, batch_size=batch_size,
                          coreset_ratio=coreset_ratio, progress=progress, cancelled=cancelled, cache=cache)


def bank_inputs_from_dataset(
    root: str | os.PathLike,
    *,
    modality: str | None = None,
    margin: int = defaults.DATASET_MARGIN,
    subjects: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
    roi: str | None = None,
    preprocess: str | None = None,
    axis: int | str = defaults.SLICE_AXIS,
    encoding: str = "standard",
):
    """The sources of a bank from the lesion-free slices of a labelled dataset (see
    :func:`~.dataset_runs.build_bank_from_dataset`), with the manifest's ``dataset`` entry."""

    cases, kind, mod = prepare_dataset(root, modality=modality, subjects=subjects, exclude=exclude, roi=roi,
                                       margin=margin, axis=axis)
    preset = preprocess or kind.preprocess
    if preset not in PREPROCESS_PRESETS:
        raise InputError(f"unknown preprocessing {preset!r}; choose one of {', '.join(sorted(PREPROCESS_PRESETS))}")
    prep = PREPROCESS_PRESETS[preset]
    groups = dataset_groups(cases, mod, prep, axis=axis, margin=margin, roi=roi, encoding=encoding)
    axis_name = axis if isinstance(axis, str) and not axis.isdigit() else str(resolve_axis(axis))
    seqs = parse_sequences(mod)
    dataset = {
        "layout": kind.name,
        "root": str(Path(root).resolve()),
        "modality": seqs[0],
        **({"sequences": list(seqs)} if len(seqs) > 1 else {}),
        "margin": int(margin),
        "normal_labels": list(kind.normal),
        "roi": roi,
        "roi_labels": list(kind.rois[roi]) if roi else None,
        "preprocess": preset,
        "subjects": [c.subject for c in cases],
        "subjects_file": str(subjects) if subjects else None,
        "exclude_subjects_file": str(exclude) if exclude else None,
    }
    context = {"layout": kind.name, "modality": mod, "margin": int(margin), "roi": roi, "encoding": encoding,
               "labels": [str(c.seg) for c in cases]}
    return BankInputs(groups, to_dict(prep), axis_name, dataset=dataset, context=context)


def build_bank_from_dataset(
    root: str | os.PathLike,
    backbone,
    *,
    modality: str | None = None,
    margin: int = defaults.DATASET_MARGIN,
    subjects: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
    roi: str | None = None,
    preprocess: str | None = None,
    axis: int | str = defaults.SLICE_AXIS,
    layout: str = defaults.PATCH_LAYOUT,
    index_type: str = defaults.INDEX_TYPE,
    batch_size: int = defaults.BATCH_SIZE,
    coreset_ratio: float | None = None,
    progress=None,
    cancelled=None,
    embed=None,
) -> MemoryBank:
    """A memory bank from the lesion-free slices of a labelled dataset (BraTS, LiTS).

    ``preprocess``: a :data:`~napari_mias_sam.method.preprocess.PREPROCESS_PRESETS` name (default: the
    layout's, ``mri`` for BraTS, ``ct-abdomen`` for LiTS). The manifest's ``dataset`` entry
    records the layout, root, modality, margin, ROI and subjects."""
    src = bank_inputs_from_dataset(root, modality=modality, margin=margin, subjects=subjects, exclude=exclude, roi=roi,
                                   preprocess=preprocess, axis=axis, encoding=encoding_of(backbone))
    bank = build_bank(src.groups, backbone, layout=layout, preprocessing=src.preprocessing, slice_axis=src.slice_axis,
                      index_type=index_type, batch_size=batch_size, coreset_ratio=coreset_ratio,
                      progress=progress, cancelled=cancelled, embed=embed)
    bank.manifest["dataset"] = src.dataset
    return bank


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
