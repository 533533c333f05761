"""A bank built in stages: every source's patch features are written to a staging folder beside
the bank (by this process, or by Dask workers on a shared filesystem), then read back in source
order into the index (one file, or shards) and calibrated.

The same :class:`~napari_mias_sam.bank.build.BuildPlan` and the same per-source function as the
streaming build (:func:`~napari_mias_sam.bank.build.encode_source`) make the same bank, whichever
process encoded a source and in whatever order. A source is staged as three files, the JSON last
(a source counts as staged only when its JSON is there and names the same inputs and options), so
an interrupted build leaves whole sources and resumes from them (``resume=True``).

Staging folder: ``.<bank name>.mias-sam-staging`` beside the bank; it holds float32 features
(4 KB per 1,024-d patch, as much as a flat index) and the shards while they are assembled, and is
removed once the bank is saved.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np
import torch

from ..core.atomic_outputs import atomic_path
from ..core.errors import InputError
from ..method.patches import GRID
from .build import BuildPlan, SourcePart, encode_source, finish_bank
from .indexes import IndexSink
from .knn import TorchSearcher
from .shards import ShardedIndex, ShardSink, read_shard, shard_sizes
from ..core.progress import ProgressFn, counter
from .store import MemoryBank, SliceGroup

__all__ = ["STAGING_SUFFIX", "staging_dir", "StagingArea", "PartWriter", "source_fingerprint", "stage_source",
           "assemble", "build_bank_staged"]

STAGING_SUFFIX = ".mias-sam-staging"
#: Patches read from a staged source and added to the index at a time (256 MiB at 1,024-d).
READ_BLOCK = 65_536


def staging_dir(bank: str | os.PathLike) -> Path:
    """The staging folder of the bank folder ``bank`` (beside it, hidden)."""
    bank = Path(bank)
    return bank.parent / f".{bank.name}{STAGING_SUFFIX}"


def source_fingerprint(group: SliceGroup, gi: int, plan: BuildPlan, backbone_info: dict, context: dict | None = None) -> dict:
    """What a staged source must match to be reused: the source (path, size, modification time),
    its place and calibration share, the plan's options and the backbone's identity."""
    fp: dict = {"index": gi, "name": group.name, "path": group.path, "n": int(group.n), "share": int(plan.shares[gi]),
                "layout": plan.layout, "preprocessing": plan.preprocessing, "slice_axis": plan.slice_axis,
                "batch_size": plan.batch_size, "coreset_ratio": plan.coreset_ratio, "chunk_patches": plan.chunk_patches,
                "backbone": {k: backbone_info.get(k) for k in ("name", "weights_sha256", "encoding", "precision")},
                "context": context or {}}
    if group.path and Path(group.path).is_file():
        st = Path(group.path).stat()
        fp["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return json.loads(json.dumps(fp, default=str))  # as it reads back from JSON


class StagingArea:
    """The staging folder: ``source-NNNNN.npy`` (kept patch features, float32), ``-calib.npy``
    (held-out slices' features), ``.json`` (kept patches per slice, manifest entry, fingerprint),
    and ``shards/`` while a sharded bank is assembled."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def paths(self, gi: int) -> dict[str, Path]:
        stem = self.folder / f"source-{gi:05d}"
        return {"features": stem.with_suffix(".npy"), "calib": Path(f"{stem}-calib.npy"), "meta": stem.with_suffix(".json")}

    def meta(self, gi: int) -> dict | None:
        try:
            return json.loads(self.paths(gi)["meta"].read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def done(self, gi: int, fingerprint: dict) -> bool:
        """Source ``gi`` is staged whole, with the same fingerprint."""
        m = self.meta(gi)
        p = self.paths(gi)
        return m is not None and m.get("fingerprint") == fingerprint and p["features"].is_file() and p["calib"].is_file()

    def staged(self) -> list[int]:
        """Sources with a JSON (whole), whatever their fingerprint."""
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("source-*.json") if p.stem.split("-")[1].isdigit())

    def read(self, gi: int) -> tuple[SourcePart, np.ndarray]:
        """The staged part of source ``gi`` and its features (memory-mapped)."""
        m = self.meta(gi)
        if m is None:
            raise InputError(f"{self.paths(gi)['meta']}: missing or damaged; the staged build is incomplete, rerun it with --resume.")
        p = self.paths(gi)
        feats = np.load(p["features"], mmap_mode="r", allow_pickle=False)
        calib = np.load(p["calib"], allow_pickle=False)
        part = SourcePart(kept=np.asarray(m["kept"], dtype=np.int64), calib=list(zip(m["calib_slices"], calib)), source=m["source"])
        if len(feats) != part.patches:
            raise InputError(f"{p['features']}: holds {len(feats)} patches, its JSON says {part.patches}; rerun with --resume "
                             "after deleting it.")
        return part, feats

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class PartWriter:
    """:func:`encode_source`'s output into the staging area: without a coreset the source's rows
    are known once it is loaded and stream into a memory-mapped ``.npy``; a coreset's (fewer) rows
    are gathered and written at the end. Temporary names until :meth:`close`."""

    def __init__(self, area: StagingArea, gi: int, dim: int, coreset: bool) -> None:
        self.area, self.gi, self.dim, self.coreset = area, gi, dim, coreset
        self.tmp = area.paths(gi)["features"].with_name(f".source-{gi:05d}.{os.getpid()}.npy.part")
        self._mm = None
        self._rows = 0
        self._blocks: list[np.ndarray] = []

    def begin(self, n: int) -> None:
        if not self.coreset:
            self._mm = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(n * GRID * GRID, self.dim))

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32).reshape(-1, self.dim)
        if self._mm is not None:
            self._mm[self._rows : self._rows + len(block)] = block
        else:
            self._blocks.append(block.copy())
        self._rows += len(block)

    def close(self, part: SourcePart, fingerprint: dict) -> dict:
        """Put the files in place (the JSON last) and return the JSON's content."""
        p = self.area.paths(self.gi)
        if self._mm is not None:
            self._mm.flush()
            del self._mm
            self._mm = None
        else:
            with open(self.tmp, "wb") as fh:
                np.save(fh, np.concatenate(self._blocks) if self._blocks else np.zeros((0, self.dim), np.float32))
            self._blocks.clear()
        os.replace(self.tmp, p["features"])
        calib_tmp = p["calib"].with_name(f".{p['calib'].name}.{os.getpid()}.part")
        with open(calib_tmp, "wb") as fh:
            np.save(fh, np.stack([f for _, f in part.calib]) if part.calib else np.zeros((0, GRID * GRID, self.dim), np.float32))
        os.replace(calib_tmp, p["calib"])
        meta = {"kept": part.kept.tolist(), "calib_slices": [int(s) for s, _ in part.calib], "source": part.source,
                "fingerprint": fingerprint}
        meta_tmp = p["meta"].with_name(f".{p['meta'].name}.{os.getpid()}.part")
        meta_tmp.write_text(json.dumps(meta, default=str), encoding="utf-8")
        os.replace(meta_tmp, p["meta"])
        return meta

    def discard(self) -> None:
        self._mm = None
        self._blocks.clear()
        self.tmp.unlink(missing_ok=True)


def stage_source(area: StagingArea, gi: int, group: SliceGroup, plan: BuildPlan, encode: Callable[[torch.Tensor], torch.Tensor],
                 fingerprint: dict, *, device=None, advance: Callable[[int], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> dict:
    """Encode source ``gi`` into the staging area; returns its JSON (small: what a worker sends back)."""
    area.folder.mkdir(parents=True, exist_ok=True)
    out = PartWriter(area, gi, plan.dim, plan.coreset_ratio is not None)
    try:
        part = encode_source(group, gi, plan, encode, out, device=device, advance=advance, cancelled=cancelled)
        out.close(part, fingerprint)
    except BaseException:
        out.discard()
        raise
    return {"index": gi, "patches": part.patches, "slices": len(part.kept), "skipped": int(part.source.get("skipped_empty", 0))}


def assemble(area: StagingArea, n_sources: int, plan: BuildPlan, backbone_info: dict, *, searcher_for=None, device=None,
             progress: ProgressFn | None = None) -> MemoryBank:
    """Read the staged sources in order into the index (``plan.shards`` > 1: shards written one at a
    time into ``area/shards``, then memory-mapped) and calibrate. ``searcher_for(files, sizes, ivf)``:
    a searcher of the index files that calibrates elsewhere (Dask workers; a one-file index is
    written to the staging area for them first); ``device``: a CUDA device calibrates with the torch search
    there, as the streaming build does."""
    parts, feats = zip(*(area.read(gi) for gi in range(n_sources))) if n_sources else ((), ())
    total = sum(p.patches for p in parts)
    entries = None
    if plan.shards > 1:
        shard_dir = area.folder / "shards"
        shutil.rmtree(shard_dir, ignore_errors=True)
        shard_dir.mkdir(parents=True)
        sink: IndexSink = ShardSink(plan.dim, plan.index_type, plan.expected, shard_sizes(total, plan.shards), shard_dir)
    else:
        sink = IndexSink(plan.dim, plan.index_type, plan.expected)
    done = 0
    for f in feats:
        for r0 in range(0, len(f), READ_BLOCK):
            sink.add(np.asarray(f[r0 : r0 + READ_BLOCK]))
            done += min(READ_BLOCK, len(f) - r0)
            if progress:
                progress("assemble the index", done, total)
    if isinstance(sink, ShardSink):
        entries = sink.finish()
        index = ShardedIndex([read_shard(sink.folder / e["file"]) for e in entries], [sink.folder / e["file"] for e in entries]) \
            if entries else None
    else:
        index = sink.finish()
    searcher = None
    if searcher_for is not None and index is not None:
        if isinstance(index, ShardedIndex):
            files, sizes, ivf = index.files, [s.ntotal for s in index.shards], index.ivf
        else:
            files, sizes = [area.folder / "index.faiss"], [index.ntotal]
            ivf = faiss.try_extract_index_ivf(index) is not None
            with atomic_path(files[0]) as tmp:
                faiss.write_index(index, str(tmp))
        searcher = searcher_for(files, sizes, ivf)
    if searcher is None and device is not None and torch.device(device).type == "cuda" and index is not None:
        searcher = TorchSearcher(index, device=device)
    del feats
    return finish_bank(index, list(parts), plan, backbone_info, index_info=sink.info, searcher=searcher, progress=progress,
                       shards=entries)


def build_bank_staged(
    groups: Sequence[SliceGroup],
    plan: BuildPlan,
    staging: str | os.PathLike,
    *,
    backbone=None,
    backbone_info: dict | None = None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    precision: str | None = None,
    resume: bool = False,
    context: dict | None = None,
    run_sources: Callable[[list[int], list[dict]], None] | None = None,
    searcher_for: Callable | None = None,
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> MemoryBank:
    """Stage every source not yet staged (here with ``backbone``, or by ``run_sources(todo,
    fingerprints)``, e.g. Dask workers), then :func:`assemble`. Without ``resume`` a staging folder
    that already holds sources is refused (they may be an earlier build's: say what to do)."""
    area = StagingArea(staging)
    info = backbone_info or backbone.describe()
    who = {**info, "precision": precision or getattr(backbone, "precision", "fp32")}
    fps = [source_fingerprint(g, gi, plan, who, context) for gi, g in enumerate(groups)]
    staged = area.staged()
    if staged and not resume:
        raise InputError(f"{area.folder}: holds {len(staged)} source(s) staged by an earlier build of this bank that did not "
                         "finish; pass --resume to continue from them, or delete that folder to start again.")
    todo = [gi for gi in range(len(groups)) if not area.done(gi, fps[gi])]
    if log and resume:
        reused = len(groups) - len(todo)
        log(f"resume: {reused} of {len(groups)} sources already staged in {area.folder}"
            + (f"; {len([g for g in staged if g in todo])} staged with other inputs or options are encoded again" if staged else ""))
    area.folder.mkdir(parents=True, exist_ok=True)
    if todo:
        if run_sources is not None:
            run_sources(todo, [fps[gi] for gi in todo])
        else:
            encode = embed or backbone.encode
            device = getattr(backbone, "device", None)
            advance = counter(progress, "encode normal slices", sum(groups[gi].n for gi in todo))

            for gi in todo:
                stage_source(area, gi, groups[gi], plan, encode, fps[gi], device=device, advance=advance, cancelled=cancelled)
    return assemble(area, len(groups), plan, info, searcher_for=searcher_for, device=getattr(backbone, "device", None),
                    progress=progress)
