"""Building a memory bank: encode normal slices, keep their patch features (optionally a coreset)
in a faiss index, and calibrate the normal scores (leave-one-source-out)."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from ..core import defaults
from ..method.anomaly import maps_from_scores, mean_of_k_nearest
from ..method.regions import MAP_QUANTILES, local_peaks
from ..core.errors import Cancelled, InputError
from ..method.patches import GRID, feature_dim, patch_features, PATCH_LAYOUTS
from .coreset import DEFAULT_PROJECT_DIM, coreset_indices
from .indexes import IndexSink, check_index_type
from .bounded_knn import MIN_BANK, searcher_for, torch_arithmetic
from .knn import TorchSearcher
from .shards import search_excluding
from .store import (
    BANK_FORMAT,
    BANK_FORMAT_VERSION,
    CORESET_CHUNK,
    CORESET_CHUNK_CPU,
    INDEX_FILE,
    SHARDED_FORMAT_VERSION,
    MemoryBank,
    SliceGroup,
)
from ..core.progress import CancelFn, ProgressFn, counter

__all__ = ["build_bank", "CALIBRATION_KS", "BuildPlan", "SourcePart", "make_plan", "encode_source", "finish_bank",
           "calibration_shares"]

CALIBRATION_KS = (1, 2, 3, 4, 5)
#: Calibration slices searched together (their queries x a 65,536-patch bank chunk: 1 GiB of distances).
CALIBRATION_BATCH = 4


# -- building -----------------------------------------------------------------------------
def calibration_shares(groups_sizes: list[int], budget: int) -> list[int]:
    """How many held-out calibration slices each group gives (about ``budget`` in all)."""
    total = max(sum(groups_sizes), 1)
    return [min(n, max(1, round(budget * n / total))) if n else 0 for n in groups_sizes]


@dataclass(frozen=True)
class BuildPlan:
    """Everything a source's encoding depends on besides the backbone, fixed before any source is
    encoded (from the groups' expected sizes): the same plan gives the same bank whether the
    sources are encoded here one after the other or by several workers in any order."""

    layout: str
    index_type: str
    preprocessing: dict
    slice_axis: str
    shares: tuple[int, ...]  # held-out calibration slices per source
    expected: int  # patches the index expects (trains SQ8 / IVF on min(TRAIN_MAX, expected))
    batch_size: int = defaults.BATCH_SIZE
    coreset_ratio: float | None = None
    chunk_patches: int = CORESET_CHUNK_CPU
    sigma: float = defaults.SIGMA
    shards: int = 1

    @property
    def dim(self) -> int:
        return feature_dim(self.layout)


def make_plan(groups: list[SliceGroup], *, layout: str, index_type: str, preprocessing: dict, slice_axis: str,
              batch_size: int = defaults.BATCH_SIZE, calibration_slices: int = 48, sigma: float = defaults.SIGMA, coreset_ratio: float | None = None,
              on_gpu: bool = False, shards: int = 1) -> BuildPlan:
    """Check the options and fix the plan of a build of ``groups``."""
    if layout not in PATCH_LAYOUTS:
        raise InputError(f"unknown patch layout {layout!r}; choose one of {', '.join(PATCH_LAYOUTS)}")
    check_index_type(index_type)
    if coreset_ratio is not None and not 0.0 < coreset_ratio <= 1.0:
        raise InputError(f"coreset ratio must be in (0, 1], got {coreset_ratio!r}")
    if not groups:
        raise InputError("no normal sources were given; the bank would be empty.")
    if shards < 1:
        raise InputError(f"--shards must be at least 1, got {shards}")
    expected = sum(g.n for g in groups) * GRID * GRID
    return BuildPlan(layout=layout, index_type=index_type, preprocessing=preprocessing, slice_axis=slice_axis,
                     shares=tuple(calibration_shares([g.n for g in groups], calibration_slices)),
                     expected=expected if coreset_ratio is None else math.ceil(expected * coreset_ratio),
                     batch_size=batch_size, coreset_ratio=coreset_ratio,
                     chunk_patches=CORESET_CHUNK if on_gpu else CORESET_CHUNK_CPU, sigma=sigma, shards=shards)


@dataclass
class SourcePart:
    """What one source gave the bank: patches kept per slice, its held-out calibration slices'
    features (all their patches, before any coreset) and its manifest entry."""

    kept: np.ndarray  # (n,) patches of each slice that went into the bank
    calib: list[tuple[int, np.ndarray]]  # (slice, (1024, d) features)
    source: dict

    @property
    def patches(self) -> int:
        return int(self.kept.sum())


def encode_source(group: SliceGroup, gi: int, plan: BuildPlan, encode: Callable[[torch.Tensor], torch.Tensor], out, *,
                  device=None, advance: Callable[[int], None] | None = None,
                  cancelled: Callable[[], bool] | None = None) -> SourcePart:
    """Encode one source's slices and hand its patch features, in bank order, to ``out``
    (``out.begin(n_slices)`` once, then ``out.add(block)``): all of them, or the greedy k-center
    coreset of each chunk of :attr:`BuildPlan.chunk_patches` patches (seeded by the chunk's number
    within the source, so a source's coreset does not depend on the other sources).
    ``advance(slices)`` after each batch (and for the skipped slices at the end)."""
    d = plan.dim
    per_slice = GRID * GRID
    loaded = group.load()
    frames, skipped = loaded[0], loaded[1]
    indices = loaded[2] if len(loaded) > 2 else None
    extra = loaded[3] if len(loaded) > 3 else {}
    n = len(frames)
    share = plan.shares[gi]
    picks = set(np.linspace(0, n - 1, min(share, n)).round().astype(int).tolist()) if n else set()
    kept = np.zeros(n, dtype=np.int64)
    calib: list[tuple[int, np.ndarray]] = []
    pending: list[np.ndarray] = []  # (b, 1024, d) blocks awaiting coreset selection
    first = 0  # slice index of pending[0][0]
    chunk = 0
    out.begin(n)

    def select_pending() -> None:
        nonlocal first, chunk
        block = np.concatenate(pending).reshape(-1, d)
        m = len(block) // per_slice
        idx = np.sort(coreset_indices(block, plan.coreset_ratio, device=device, seed=chunk, cancelled=cancelled))
        out.add(block[idx])
        kept[first : first + m] = np.bincount(idx // per_slice, minlength=m)
        pending.clear()
        first += m
        chunk += 1

    for b0 in range(0, n, plan.batch_size):
        if cancelled is not None and cancelled():
            raise Cancelled("bank build cancelled")
        batch = frames[b0 : b0 + plan.batch_size]
        feats = patch_features(encode(batch), plan.layout).cpu().numpy()
        for j in range(len(batch)):
            if b0 + j in picks:
                calib.append((b0 + j, feats[j].copy()))
        if plan.coreset_ratio is None:
            out.add(feats)
            kept[b0 : b0 + len(batch)] = per_slice
        else:
            pending.append(feats)
            if (b0 + len(batch) - first) * per_slice >= plan.chunk_patches:
                select_pending()
        if advance:
            advance(len(batch))
    if pending:
        select_pending()
    if advance and skipped:
        advance(skipped)
    src = {"name": group.name, "path": group.path, "slices": indices if indices is not None else n, "n_slices": n,
           "skipped_empty": skipped, "patches": int(kept.sum())}
    src.update(extra)
    return SourcePart(kept=kept, calib=calib, source=src)


class _SinkOut:
    """``encode_source``'s output straight into an index sink (the streaming build)."""

    def __init__(self, sink: IndexSink) -> None:
        self.sink = sink

    def begin(self, n: int) -> None:
        pass

    def add(self, block: np.ndarray) -> None:
        self.sink.add(block)


def build_bank(
    groups: Iterable[SliceGroup],
    backbone,
    *,
    layout: str = defaults.PATCH_LAYOUT,
    preprocessing: dict,
    slice_axis: str = defaults.SLICE_AXIS,
    index_type: str = defaults.INDEX_TYPE,
    batch_size: int = defaults.BATCH_SIZE,
    calibration_slices: int = 48,
    sigma: float = defaults.SIGMA,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    coreset_ratio: float | None = None,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> MemoryBank:
    """Encode every normal slice, add its patches to a faiss index (streaming, batch by batch),
    then calibrate: held-out normal slices are scored against the bank *without their own
    group*, giving the normal scale used by ``calibrated`` normalisation.

    ``index_type``: one of :data:`INDEX_TYPES` (SQ8 and IVF indexes are trained on the first
    :data:`TRAIN_MAX` patches). ``coreset_ratio`` (0 < r <= 1): keep only a greedy k-center
    coreset of that fraction of each source's patches (:mod:`napari_mias_sam.coreset`, chunks of
    :data:`CORESET_CHUNK` patches on a GPU, :data:`CORESET_CHUNK_CPU` on a CPU, on the
    backbone's device); ``None`` keeps every patch (the
    paper). ``embed`` replaces ``backbone.encode`` (e.g. a cached encoder). Raises
    :class:`Cancelled`. (A sharded, resumable or distributed build of the same groups:
    :func:`napari_mias_sam.bank.staging.build_bank_staged`; same plan, same bank.)
    """
    groups = list(groups)
    device = getattr(backbone, "device", None)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    plan = make_plan(groups, layout=layout, index_type=index_type, preprocessing=preprocessing, slice_axis=slice_axis,
                     batch_size=batch_size, calibration_slices=calibration_slices, sigma=sigma,
                     coreset_ratio=coreset_ratio, on_gpu=on_gpu)
    encode = embed or backbone.encode
    sink = IndexSink(plan.dim, index_type, plan.expected)
    advance = counter(progress, "encode normal slices", sum(g.n for g in groups))

    parts = []
    for gi, g in enumerate(groups):
        parts.append(encode_source(g, gi, plan, encode, _SinkOut(sink), device=device, advance=advance, cancelled=cancelled))
    index = sink.finish()
    searcher = TorchSearcher(index, device=device) if on_gpu and index is not None and index.ntotal else None
    bank = finish_bank(index, parts, plan, backbone.describe(), index_info=sink.info, searcher=searcher, progress=progress)
    bank._torch = searcher  # calibrate (and later search) on the GPU
    return bank


def finish_bank(index, parts: list[SourcePart], plan: BuildPlan, backbone_info: dict, *, index_info: dict,
                searcher=None, progress: ProgressFn | None = None, shards: list[dict] | None = None) -> MemoryBank:
    """Calibrate ``index`` (a faiss index or a :class:`~napari_mias_sam.bank.shards.ShardedIndex`)
    on the parts' held-out slices and write the manifest. ``searcher``: searches with exclusion
    elsewhere (a GPU, or Dask workers holding the shards); ``shards``: the shard files' entries."""
    if index is None or index.ntotal == 0:
        raise InputError("no normal slices with anatomy were found (all were empty or constant); the bank would be empty.")
    ranges, offsets, sizes, calib_feats = [], [], [], []
    start = 0
    for gi, part in enumerate(parts):
        ranges.append((start, start + part.patches))
        start += part.patches
        offsets.append(np.concatenate([[0], np.cumsum(part.kept)]))
        sizes.append(len(part.kept))
        calib_feats.extend((gi, si, f) for si, f in part.calib)
    sources = [p.source for p in parts]
    calibration = _calibrate(index, calib_feats, ranges, sizes, offsets=offsets, searcher=searcher, sigma=plan.sigma, progress=progress)
    info = {"type": plan.index_type, "metric": "squared_l2", "ntotal": int(index.ntotal), **index_info}
    if shards:
        from .shards import SHARD_ALIGN

        info.update(shards=shards, shard_align=SHARD_ALIGN)
    else:
        info["file"] = INDEX_FILE
    per_slice = GRID * GRID
    manifest = {
        "format": BANK_FORMAT,
        "format_version": BANK_FORMAT_VERSION if not shards else SHARDED_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": _package_version(),
        "backbone": backbone_info,
        "preprocessing": plan.preprocessing,
        "slice_axis": plan.slice_axis,
        "patch_layout": plan.layout,
        "feature_dim": plan.dim,
        "patch": {"grid": GRID, "size": 5, "stride": 2, "padding": 2},
        "index": info,
        "counts": {"slices": sum(sizes), "patches": int(index.ntotal), "skipped_empty_slices": sum(x["skipped_empty"] for x in sources)},
        "sources": sources,
        "calibration": calibration,
    }
    if plan.coreset_ratio is not None:
        manifest["coreset"] = {
            "method": "approximate greedy k-center (PatchCore), per source, in chunks",
            "ratio": float(plan.coreset_ratio),
            "project_dim": DEFAULT_PROJECT_DIM,
            "chunk_patches": plan.chunk_patches,
            "encoded_patches": int(sum(sizes) * per_slice),
        }
    return MemoryBank(index, manifest)


def _calibrate(index, calib_feats, ranges, sizes, *, offsets=None, searcher: TorchSearcher | None = None,
               sigma: float, progress: ProgressFn | None) -> dict:
    """Leave-one-group-out normal statistics for k = 1..5 (see :class:`Calibration`)."""
    if not calib_feats:
        return {"method": "none", "n_slices": 0, "per_k": {}}
    single = len(ranges) == 1
    kmax = max(CALIBRATION_KS)
    jobs: list[tuple[int, int, np.ndarray]] = []  # (lo, hi, features) of each usable calibration slice
    for gi, si, feats in calib_feats:
        lo, hi = ranges[gi]
        if single:
            # One source only: exclude the slice and its neighbours (+/- 10 % of the volume).
            n_g = sizes[gi]
            margin = max(1, n_g // 10)
            s0, s1 = max(0, si - margin), min(n_g, si + margin + 1)
            off = offsets[gi] if offsets is not None else np.arange(n_g + 1) * GRID * GRID
            lo, hi = ranges[gi][0] + int(off[s0]), ranges[gi][0] + int(off[s1])
            if hi - lo >= index.ntotal:
                continue
        if index.ntotal - (hi - lo) < kmax:
            continue  # too few patches left outside the held-out range (a tiny coreset)
        jobs.append((lo, hi, feats))

    def search(feats: np.ndarray, lo: int, hi: int) -> np.ndarray:
        if searcher is not None:
            return searcher.search(feats, kmax, exclude=(lo, hi))
        if index.ntotal >= MIN_BANK and torch_arithmetic(index):
            # Exact flat bank: the k nearest of a full search of the bank without the held-out range
            # (torch_knn), with its very distances (bit for bit), from the bank's PCA lower bounds
            # at a fraction of the cost; the searcher stays with the index for the bank's own
            # searches (bounded_knn.searcher_for).
            return searcher_for(index, boundaries=[b for r in ranges for b in r]).search(feats, kmax, exclude=(lo, hi))
        return search_excluding(index, feats, kmax, (lo, hi))  # IVF, compressed, or shards, in turn

    # Slices that leave out the same range are searched together (one pass over the bank for up
    # to CALIBRATION_BATCH slices): the same distances, far fewer reads of the bank.
    batches: list[list[int]] = []
    taken = [False] * len(jobs)
    for j0 in range(len(jobs)):
        if not taken[j0]:
            same = [j for j in range(j0, len(jobs)) if jobs[j][:2] == jobs[j0][:2] and not taken[j]][:CALIBRATION_BATCH]
            for j in same:
                taken[j] = True
            batches.append(same)
    queries = [(np.concatenate([jobs[j][2] for j in same]), jobs[same[0]][:2]) for same in batches]
    stage = "calibrate on held-out normal slices"
    if searcher is not None and hasattr(searcher, "search_many"):  # every batch at once (Dask workers)
        dists = searcher.search_many(queries, kmax, progress=(lambda d, t: progress(stage, d, t)) if progress else None)
    else:
        dists, done = [], 0
        for (feats, (lo, hi)), same in zip(queries, batches):
            dists.append(search(feats, lo, hi))
            done += len(same)
            if progress:
                progress(stage, done, len(jobs))
    per_slice: list[np.ndarray] = [np.empty(0)] * len(jobs)  # (kmax, 32, 32) sorted distances per slice
    for same, dist in zip(batches, dists):
        for i, j in enumerate(same):
            per_slice[j] = dist[i * GRID * GRID : (i + 1) * GRID * GRID].T.reshape(kmax, GRID, GRID)
    if not per_slice:
        return {"method": "none", "n_slices": 0, "per_k": {}}
    stack = np.stack(per_slice)  # (S, kmax, 32, 32)
    per_k = {}
    for k in CALIBRATION_KS:
        scores = mean_of_k_nearest(stack, k, axis=1)
        maps = maps_from_scores(scores, sigma=sigma)
        slice_max = maps.reshape(len(maps), -1).max(axis=1)
        per_k[str(k)] = {
            "low": float(np.median(maps)),
            "high": float(np.percentile(slice_max, 99)),
            "slice_max_map": [float(v) for v in slice_max],
            "local_peaks": local_peaks(maps),
            "map_quantiles": {q: float(v) for q, v in zip(MAP_QUANTILES, np.percentile(maps, [float(q) for q in MAP_QUANTILES]))},
            "slice_scores": [float(v) for v in scores.reshape(len(scores), -1).max(axis=1)],
            "patch_score_quantiles": {
                q: float(np.percentile(scores, float(q))) for q in ("50", "90", "99", "99.9", "100")
            },
        }
    return {
        "method": "leave-one-source-out" if not single else "leave-neighbouring-slices-out",
        "n_slices": len(per_slice),
        "sigma": sigma,
        "per_k": per_k,
    }


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("napari-mias-sam")
    except Exception:
        return "unknown"

