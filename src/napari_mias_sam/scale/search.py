"""A bank's search on Dask workers: every shard file is searched by a worker (shard i on worker
i mod W while it lives; any worker otherwise), memory-mapped and opened once per worker, and the k
nearest of the shards are merged here, exactly as :class:`~napari_mias_sam.bank.shards.ShardedIndex`
merges them in one process (the same per-shard function, the same merge: the same distances).

Two uses: the leave-one-source-out calibration of a build (``search(x, k, exclude=...)``, one batch
of held-out slices at a time), and ``evaluate``'s nearest-neighbour step (:meth:`DaskShardSearcher.unit_distances`:
every batch of every unit at once, the query features made on the workers from staged embeddings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from distributed import Client, as_completed

from ..core import defaults
from ..bank.bounded_knn import enabled as bounded_enabled
from ..bank.shards import local_range, merge_nearest
from ..method.patches import GRID
from .tasks import shard_search_task, staged_query_search_task

__all__ = ["DaskShardSearcher", "searcher_for_bank", "searcher_for_index"]


class DaskShardSearcher:
    """Searches the shard ``files`` (with ``sizes`` vectors each, in id order) on the workers of
    ``client``. ``ivf``: the shards are IVF indexes (their own search with exclusion, as one index's);
    ``nprobe``: their cells visited per query."""

    def __init__(self, client: Client, files: Sequence[str | Path], sizes: Sequence[int], *, ivf: bool = False,
                 nprobe: int | None = None) -> None:
        self.client = client
        self.files = [str(f) for f in files]
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.ivf = ivf
        self.nprobe = nprobe
        self.ntotal = int(self.offsets[-1])

    @property
    def backend(self) -> str:
        return f"dask ({len(self.files)} shard{'s' if len(self.files) != 1 else ''})"

    def _worker_for(self, i: int) -> dict:
        workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        return {"workers": [workers[i % len(workers)]], "allow_other_workers": True} if workers else {}

    def _submit_excluding(self, x: np.ndarray, k: int, exclude, exact: bool) -> list:
        x = np.ascontiguousarray(x, dtype=np.float32)
        xf = self.client.scatter(x, broadcast=len(self.files) > 1) if x.nbytes > 1 << 20 else x
        out = []
        for i, f in enumerate(self.files):
            loc = local_range(exclude, int(self.offsets[i]), self.sizes[i])
            out.append((i, self.client.submit(shard_search_task, f, xf, k, loc, exact or not self.ivf, self.nprobe,
                                              pure=False, **self._worker_for(i))))
        return out

    def _gather(self, futures: list, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        parts = []
        for i, fut in futures:
            d, ids = fut.result()
            if d.shape[1]:
                parts.append((d, None if ids is None else np.where(ids >= 0, ids + self.offsets[i], -1)))
        return merge_nearest(parts, k)

    def search(self, x, k: int = defaults.K, *, exclude: tuple[int, int] | None = None) -> np.ndarray:
        """Squared L2 distances (M, k): with ``exclude``, as
        :func:`~napari_mias_sam.bank.shards.search_excluding` (the calibration's search); without,
        as the bank's own search."""
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        if exclude is None:
            bounded = bounded_enabled()  # the driver's choice, whatever the workers' environment says
            futures = [(i, self.client.submit(shard_search_task, f, x, k, None, False, self.nprobe, bounded, pure=False,
                                              **self._worker_for(i)))
                       for i, f in enumerate(self.files)]
            return np.maximum(self._gather(futures, k)[0], 0.0)
        return self.search_many([(x, exclude)], k)[0]

    def search_many(self, queries: Sequence[tuple[np.ndarray, tuple[int, int]]], k: int,
                    progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """:meth:`search` with exclusion of many ``(features, exclude)`` batches, all submitted at
        once (the calibration's batches keep every worker busy)."""
        pending = [self._submit_excluding(x, k, ex, exact=False) for x, ex in queries]
        out = []
        for n, ((x, ex), futures) in enumerate(zip(queries, pending)):
            dist, ids = self._gather(futures, k)
            if ids is not None and (ids < 0).any():  # IVF cells with too few other patches: exactly, as one index does
                dist, _ = self._gather(self._submit_excluding(x, k, ex, exact=True), k)
            out.append(np.maximum(dist, 0.0))
            if progress:
                progress(n + 1, len(queries))
        return out

    def unit_distances(self, units: Sequence[tuple[str, int]], layout: str, k: int, *, batch_slices: int,
                       progress: Callable[[str, int, int], None] | None = None, stage: str = "nearest-neighbour search") -> list[np.ndarray]:
        """(N, 1024, k) sorted distances of each unit's slices (``units``: staged embeddings file and
        slice count), searched in batches of ``batch_slices`` slices as the pipeline searches them
        (:func:`~napari_mias_sam.pipeline.segment.neighbour_distances`), every batch of every unit
        submitted at once."""
        k = min(k, self.ntotal)
        out = [np.zeros((n, GRID * GRID, k), np.float32) for _, n in units]
        jobs = {}
        bounded = bounded_enabled()  # the driver's choice, whatever the workers' environment says
        for u, (path, n) in enumerate(units):
            for b0 in range(0, n, batch_slices):
                b1 = min(n, b0 + batch_slices)
                for i, f in enumerate(self.files):
                    fut = self.client.submit(staged_query_search_task, f, path, b0, b1, layout, k, self.nprobe, bounded,
                                             pure=False, **self._worker_for(i))
                    jobs[fut] = (u, b0, b1, i)
        results: dict[tuple[int, int], dict[int, tuple]] = {}
        total = sum(-(-n // batch_slices) for _, n in units)
        done = 0
        for fut in as_completed(list(jobs)):
            u, b0, b1, i = jobs[fut]
            d, ids = fut.result()
            got = results.setdefault((u, b0), {})
            got[i] = (d, None if ids is None else np.where(ids >= 0, ids + self.offsets[i], -1))
            if len(got) == len(self.files):
                dist = merge_nearest([got[j] for j in range(len(self.files))], k)[0]
                out[u][b0:b1] = np.maximum(dist, 0.0).reshape(b1 - b0, GRID * GRID, -1)
                del results[(u, b0)]
                done += 1
                if progress:
                    progress(stage, done, total)
        return out


def searcher_for_index(client: Client, index) -> DaskShardSearcher:
    """The workers' searcher of a bank index whose files are on disk (a sharded index)."""
    files = getattr(index, "files", None)
    if not files:
        raise ValueError("the index's shards are not on disk; save the bank first")
    return DaskShardSearcher(client, files, [s.ntotal for s in index.shards], ivf=index.ivf)


def searcher_for_bank(client: Client, bank) -> DaskShardSearcher:
    """The workers' searcher of a saved bank (its shards, or its one index file)."""
    from ..bank.shards import ShardedIndex

    if isinstance(bank.index, ShardedIndex):
        s = searcher_for_index(client, bank.index)
    else:
        if bank.path is None:
            raise ValueError("the bank is not saved; its index must be on disk for the workers")
        import faiss

        f = Path(bank.path) / bank.manifest["index"].get("file", "index.faiss")
        s = DaskShardSearcher(client, [f], [bank.ntotal], ivf=faiss.try_extract_index_ivf(bank.index) is not None)
    s.nprobe = bank.nprobe
    return s
