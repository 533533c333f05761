"""``segment`` and ``evaluate`` on Dask workers.

``segment``: one task per volume (the whole pipeline on a worker, with its backbone and the bank
memory-mapped); the worker writes the three outputs into temporary files this process claimed,
and this process moves them into place (the same all-or-nothing outputs as a run in one process).

``evaluate``: the test units are encoded on the workers (embeddings written to a staging folder
beside the results, not sent through the scheduler); the nearest-neighbour search of every unit
goes to the workers shard by shard (:class:`~napari_mias_sam.scale.search.DaskShardSearcher`, the
path the calibration takes); the decode passes and the metrics run here, as in one process.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from distributed import as_completed

from ..core import defaults
from ..core.errors import MiasSamError
from ..jobs.preflight import KNN_BATCH_SLICES
from .cluster import DaskSession
from .search import searcher_for_bank
from .tasks import encode_unit_task, segment_volume_task

__all__ = ["segment_on_dask", "evaluate_hooks", "EVAL_STAGING"]

#: The staging folder of ``evaluate --dask`` inside its output folder (removed at the end).
EVAL_STAGING = ".mias-sam-evaluate-staging"


def segment_on_dask(session: DaskSession, jobs: list, claims: list, paths: list[dict[str, Path]], bank_path: str | os.PathLike,
                    settings, rule_args: tuple = (), *, axis=None, cache_root: str | None = None,
                    batch_size: int = defaults.BATCH_SIZE) -> Iterator[tuple[int, dict | BaseException]]:
    """Submit one task per volume (``jobs``: :class:`~napari_mias_sam.jobs.dataset_runs.SegmentInput`,
    ``claims``: their claimed output sets, ``paths``: their final output paths) and yield
    ``(volume number, report or the error it raised)`` as they finish; a finished volume's outputs
    are committed before it is yielded. ``rule_args``: the lesions' rule (connectivity, minimum
    voxels, minimum mL)."""
    run = uuid.uuid4().hex[:8]
    futures = {}
    for n, (job, claim) in enumerate(zip(jobs, claims)):
        temps = {key: str(claim.temp(p.name)) for key, p in paths[n].items()}
        fut = session.client.submit(segment_volume_task, job, str(bank_path), settings, tuple(rule_args), axis, temps, cache_root, batch_size,
                                    key=f"segment-{n:05d}-{run}", pure=False)
        futures[fut] = n
    try:
        for fut in as_completed(list(futures)):
            n = futures[fut]
            try:
                rep = fut.result()
            except (MiasSamError, ValueError, ArithmeticError, MemoryError) as exc:
                yield n, exc
                continue
            claims[n].commit()
            yield n, {"volume": rep.pop("volume"), "outputs": {k: str(v) for k, v in paths[n].items()}, **rep}
    except BaseException:
        session.client.cancel(list(futures))
        raise


def evaluate_hooks(session: DaskSession, out_dir: str | os.PathLike, *, cache_root: str | None = None,
                   progress: Callable[[str, int, int], None] | None = None):
    """``(encode_units, neighbour_distances, cleanup)`` for :func:`napari_mias_sam.evaluation.sweep.evaluate`:
    the encoding and the searches on the session's workers, staged in ``out_dir``."""
    staging = Path(out_dir) / EVAL_STAGING
    files: dict[int, tuple[str, int]] = {}  # unit id -> (embeddings file, slices)

    def encode_units(units, backbone, cache, progress_fn, batch_size: int) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        run = uuid.uuid4().hex[:8]
        futures = {}
        for i, u in enumerate(units):
            path = staging / f"unit-{i:05d}-{run}.npy"
            fut = session.client.submit(encode_unit_task, u.frames, str(path), cache_root, batch_size,
                                        key=f"encode-unit-{i:05d}-{run}", pure=False)
            futures[fut] = (i, path)
        total = sum(len(u.frames) for u in units)
        done = 0
        for fut in as_completed(list(futures)):
            i, path = futures[fut]
            fut.result()
            u = units[i]
            u.embeddings = torch.from_numpy(np.load(path, allow_pickle=False))
            files[id(u)] = (str(path), len(u.frames))
            done += len(u.frames)
            if progress_fn:
                progress_fn(f"encode test slices on {len(session.workers)} Dask workers", done, total)

    def neighbour_distances(bank, units, k: int) -> list[np.ndarray]:
        searcher = searcher_for_bank(session.client, bank)
        name = bank.path.name if bank.path else "bank"
        return searcher.unit_distances([files[id(u)] for u in units], bank.layout, k, batch_slices=KNN_BATCH_SLICES,
                                       progress=progress, stage=f"nearest-neighbour search ({name}, {searcher.backend})")

    def cleanup() -> None:
        shutil.rmtree(staging, ignore_errors=True)

    return encode_units, neighbour_distances, cleanup
