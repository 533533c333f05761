"""Building a memory bank: encode normal slices, keep their patch features (optionally a coreset)
in a faiss index, and calibrate the normal scores (leave-one-source-out)."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Callable, Iterable

import faiss
import numpy as np
import torch

from ..core import defaults
from ..method.anomaly import maps_from_scores, mean_of_k_nearest
from ..core.errors import Cancelled, InputError
from ..method.patches import GRID, feature_dim, patch_features, PATCH_LAYOUTS
from .coreset import DEFAULT_PROJECT_DIM, coreset_indices
from .indexes import IndexSink, check_index_type
from .bounded_knn import BoundedSearcher
from .knn import TorchSearcher, torch_knn
from .store import (
    BANK_FORMAT,
    BANK_FORMAT_VERSION,
    CORESET_CHUNK,
    CORESET_CHUNK_CPU,
    INDEX_FILE,
    MemoryBank,
    SliceGroup,
)
from ..core.progress import CancelFn, ProgressFn

__all__ = ["build_bank", "CALIBRATION_KS"]

CALIBRATION_KS = (1, 2, 3, 4, 5)
#: Calibration slices searched together (their queries x a 65,536-patch bank chunk: 1 GiB of distances).
CALIBRATION_BATCH = 4


# -- building -----------------------------------------------------------------------------
def _calibration_shares(groups_sizes: list[int], budget: int) -> list[int]:
    """How many held-out calibration slices each group gives (about ``budget`` in all)."""
    total = max(sum(groups_sizes), 1)
    return [min(n, max(1, round(budget * n / total))) if n else 0 for n in groups_sizes]


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
    :class:`Cancelled`.
    """
    if layout not in PATCH_LAYOUTS:
        raise InputError(f"unknown patch layout {layout!r}; choose one of {', '.join(PATCH_LAYOUTS)}")
    check_index_type(index_type)
    if coreset_ratio is not None and not 0.0 < coreset_ratio <= 1.0:
        raise InputError(f"coreset ratio must be in (0, 1], got {coreset_ratio!r}")
    groups = list(groups)
    if not groups:
        raise InputError("no normal sources were given; the bank would be empty.")
    encode = embed or backbone.encode
    d = feature_dim(layout)
    per_slice = GRID * GRID
    expected = sum(g.n for g in groups) * per_slice
    sink = IndexSink(d, index_type, expected if coreset_ratio is None else math.ceil(expected * coreset_ratio))
    device = getattr(backbone, "device", None)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    chunk_patches = CORESET_CHUNK if on_gpu else CORESET_CHUNK_CPU
    n_coreset_chunks = 0
    shares = _calibration_shares([g.n for g in groups], calibration_slices)
    calib_feats: list[tuple[int, int, np.ndarray]] = []  # (group, slice, features)
    ranges: list[tuple[int, int]] = []
    offsets: list[np.ndarray] = []  # per group: bank id of each slice's first patch, relative to the group's start
    sizes: list[int] = []
    sources: list[dict] = []
    total = sum(g.n for g in groups)
    done = 0
    for gi, g in enumerate(groups):
        loaded = g.load()
        frames, skipped = loaded[0], loaded[1]
        indices = loaded[2] if len(loaded) > 2 else None
        extra = loaded[3] if len(loaded) > 3 else {}
        n = len(frames)
        picks = set(np.linspace(0, n - 1, min(shares[gi], n)).round().astype(int).tolist()) if n else set()
        start = sink.count
        kept = np.zeros(n, dtype=np.int64)  # patches of each slice that went into the bank
        pending: list[np.ndarray] = []  # (b, 1024, d) blocks awaiting coreset selection
        first = 0  # slice index of pending[0][0]

        def select_pending() -> None:
            nonlocal first, n_coreset_chunks
            block = np.concatenate(pending).reshape(-1, d)
            m = len(block) // per_slice
            idx = np.sort(coreset_indices(block, coreset_ratio, device=device, seed=n_coreset_chunks, cancelled=cancelled))
            sink.add(block[idx])
            kept[first : first + m] = np.bincount(idx // per_slice, minlength=m)
            pending.clear()
            first += m
            n_coreset_chunks += 1

        for b0 in range(0, n, batch_size):
            if cancelled is not None and cancelled():
                raise Cancelled("bank build cancelled")
            batch = frames[b0 : b0 + batch_size]
            feats = patch_features(encode(batch), layout).cpu().numpy()
            for j in range(len(batch)):
                if b0 + j in picks:
                    calib_feats.append((gi, b0 + j, feats[j].copy()))
            if coreset_ratio is None:
                sink.add(feats)
                kept[b0 : b0 + len(batch)] = per_slice
            else:
                pending.append(feats)
                if (b0 + len(batch) - first) * per_slice >= chunk_patches:
                    select_pending()
            done += len(batch)
            if progress:
                progress("encode normal slices", done, total)
        if pending:
            if progress:
                progress(f"coreset of {g.name}", 0, 1)
            select_pending()
        done += skipped
        ranges.append((start, sink.count))
        offsets.append(np.concatenate([[0], np.cumsum(kept)]))
        sizes.append(n)
        src = {"name": g.name, "path": g.path, "slices": indices if indices is not None else n, "n_slices": n,
               "skipped_empty": skipped, "patches": int(sink.count - start)}
        src.update(extra)
        sources.append(src)
    index = sink.finish()
    if index is None or index.ntotal == 0:
        raise InputError("no normal slices with anatomy were found (all were empty or constant); the bank would be empty.")

    searcher = None
    if on_gpu:
        searcher = TorchSearcher(index, device=device)  # calibrate (and later search) on the GPU
    calibration = _calibrate(index, calib_feats, ranges, sizes, offsets=offsets, searcher=searcher, sigma=sigma, progress=progress)
    index_info = {"type": index_type, "metric": "squared_l2", "ntotal": int(index.ntotal), "file": INDEX_FILE, **sink.info}
    encoded_patches = sum(sizes) * per_slice
    manifest = {
        "format": BANK_FORMAT,
        "format_version": BANK_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": _package_version(),
        "backbone": backbone.describe(),
        "preprocessing": preprocessing,
        "slice_axis": slice_axis,
        "patch_layout": layout,
        "feature_dim": d,
        "patch": {"grid": GRID, "size": 5, "stride": 2, "padding": 2},
        "index": index_info,
        "counts": {"slices": sum(sizes), "patches": int(index.ntotal), "skipped_empty_slices": sum(x["skipped_empty"] for x in sources)},
        "sources": sources,
        "calibration": calibration,
    }
    if coreset_ratio is not None:
        manifest["coreset"] = {
            "method": "approximate greedy k-center (PatchCore), per source, in chunks",
            "ratio": float(coreset_ratio),
            "project_dim": DEFAULT_PROJECT_DIM,
            "chunk_patches": chunk_patches,
            "encoded_patches": int(encoded_patches),
        }
    bank = MemoryBank(index, manifest)
    bank._torch = searcher
    return bank


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

    bounded: list[BoundedSearcher] = []  # built on first use: exact search with PCA lower bounds (CPU)

    def search(feats: np.ndarray, lo: int, hi: int) -> np.ndarray:
        if searcher is not None:
            return searcher.search(feats, kmax, exclude=(lo, hi))
        if faiss.try_extract_index_ivf(index) is not None:
            # IVF: its own (approximate) search, as queries will get; it honours ID selectors cheaply
            ivf = faiss.extract_index_ivf(index)
            params = faiss.SearchParametersIVF(sel=faiss.IDSelectorNot(faiss.IDSelectorRange(lo, hi)), nprobe=int(ivf.nprobe))
            dist, ids = index.search(np.ascontiguousarray(feats, dtype=np.float32), kmax, params=params)
            if (ids < 0).any():  # the visited cells held too few patches of other sources: search exactly
                dist = torch_knn(feats, index, kmax, exclude=(lo, hi))
            return np.maximum(dist, 0.0)
        # Exact: the same k nearest as a full search of the bank without the held-out range
        # (torch_knn), from its PCA lower bounds, at a fraction of the cost.
        if not bounded:
            bounded.append(BoundedSearcher(index, boundaries=[b for r in ranges for b in r]))
        return bounded[0].search(feats, kmax, exclude=(lo, hi))

    # Slices that leave out the same range are searched together (one pass over the bank for up
    # to CALIBRATION_BATCH slices): the same distances, far fewer reads of the bank.
    per_slice: list[np.ndarray] = [np.empty(0)] * len(jobs)  # (kmax, 32, 32) sorted distances per slice
    done = 0
    for j0 in range(len(jobs)):
        if per_slice[j0].size:
            continue
        same = [j for j in range(j0, len(jobs)) if jobs[j][:2] == jobs[j0][:2] and not per_slice[j].size][:CALIBRATION_BATCH]
        dist = search(np.concatenate([jobs[j][2] for j in same]), *jobs[j0][:2])
        for i, j in enumerate(same):
            per_slice[j] = dist[i * GRID * GRID : (i + 1) * GRID * GRID].T.reshape(kmax, GRID, GRID)
        done += len(same)
        if progress:
            progress("calibrate on held-out normal slices", done, len(jobs))
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

