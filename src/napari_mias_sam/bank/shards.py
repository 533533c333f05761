"""A bank index cut into shards: consecutive id ranges, one faiss file each, searched in turn
(memory-mapped) or by several workers, with the k nearest of every shard merged.

Why shards: a bank from hundreds of BraTS subjects is larger than one process's memory. A sharded
bank is built holding one shard in memory at a time (:class:`ShardSink`), and searched from
memory-mapped files (the operating system pages them in and out), one shard after the other
(:class:`ShardedIndex`) or one shard per worker (``napari_mias_sam.scale``).

Same results as one index: every shard is an index of the same type (SQ8 and IVF shards share
one trained quantizer; an IVF search visits the same cells in every shard); shard sizes are
multiples of :data:`SHARD_ALIGN` (faiss's exact search cuts the bank into blocks of 1,024 vectors,
so every distance is computed in the same block as in one index: bit-identical distances); the
leave-one-source-out calibration searches each shard exactly (torch) and keeps the k smallest.
:func:`search_excluding` is the one search of the calibration, for one index or a sharded one.
Exact (flat) shards searched without exclusion give the bounded search's distances
(:func:`~napari_mias_sam.bank.bounded_knn.flat_search`: torch_knn's arithmetic, each distance the
same bits whichever shard or block holds the vector) wherever one index's search gives them, so the
merged k nearest are again one index's; with ``MIAS_SAM_BOUNDED_KNN=0`` or where the BLAS probe
fails, faiss's search in every path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from .bounded_knn import flat_search
from .indexes import IndexSink, set_nprobe
from .knn import index_vectors, torch_knn

__all__ = [
    "SHARD_ALIGN",
    "ShardedIndex",
    "ShardSink",
    "shard_sizes",
    "shard_file_name",
    "merge_nearest",
    "shard_search",
    "search_excluding",
    "local_range",
    "read_shard",
]

#: Shard sizes are multiples of this many vectors: faiss's exact (BLAS) search works on blocks of
#: 1,024 bank vectors, so shard boundaries on block boundaries keep every distance bit-identical
#: to one index's (measured: a boundary elsewhere changed distances by 1 ulp).
SHARD_ALIGN = 1024


def shard_sizes(ntotal: int, n_shards: int) -> list[int]:
    """Sizes of at most ``n_shards`` consecutive shards holding ``ntotal`` vectors: equal multiples
    of :data:`SHARD_ALIGN`, the last one smaller (fewer shards when the bank is small)."""
    if ntotal <= 0:
        return []
    per = max(SHARD_ALIGN, math.ceil(ntotal / max(1, n_shards) / SHARD_ALIGN) * SHARD_ALIGN)
    sizes = [per] * (ntotal // per)
    if ntotal % per:
        sizes.append(ntotal % per)
    return sizes


def shard_file_name(i: int, n: int) -> str:
    return f"index-{i:05d}-of-{n:05d}.faiss"


def read_shard(path: str | os.PathLike, *, mmap: bool = True) -> faiss.Index:
    """One shard file (memory-mapped and read-only by default)."""
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(str(path), flags)


def local_range(exclude: tuple[int, int] | None, start: int, n: int) -> tuple[int, int] | None:
    """The part of the global id range ``exclude`` inside the shard ``start:start+n``, in the
    shard's own ids (None when they do not meet)."""
    if exclude is None:
        return None
    lo, hi = max(exclude[0], start), min(exclude[1], start + n)
    return (lo - start, hi - start) if lo < hi else None


def merge_nearest(parts: Sequence[tuple[np.ndarray, np.ndarray | None]], k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The k smallest distances (and their ids, when every part has ids) of several shards'
    results ``(D (M, k_i), I (M, k_i) global ids or None)``, taken in shard order (ties keep the
    earlier shard's neighbour, as a search of one index visits it first)."""
    d = np.concatenate([p[0] for p in parts], axis=1)
    with_ids = all(p[1] is not None for p in parts)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, order, axis=1)
    ids = np.take_along_axis(np.concatenate([p[1] for p in parts], axis=1), order, axis=1) if with_ids else None
    return dist, ids


def _ivf(index) -> faiss.IndexIVF | None:
    return faiss.try_extract_index_ivf(index) if isinstance(index, faiss.Index) else None


def shard_search(index: faiss.Index, feats: np.ndarray, k: int, *, exclude: tuple[int, int] | None = None,
                 exact: bool = False, bounded: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Search one index (a shard): ``(D, I)`` of the k nearest, ids local to it.

    Without ``exclude``: :func:`~napari_mias_sam.bank.bounded_knn.flat_search` (an exact flat index:
    the bounded search's distances, torch_knn's bit for bit, and no ids, unless ``bounded`` is
    False, :data:`~napari_mias_sam.bank.bounded_knn.ENV` is 0 when ``bounded`` is None, or the
    BLAS probe fails; any other index: its own search). With ``exclude=(lo, hi)`` (local ids left
    out, the calibration's held-out source): an IVF index searches its visited cells with an ID
    selector (as queries get; ids -1 where the cells held too few others), any other index is
    searched exactly by :func:`~napari_mias_sam.bank.knn.torch_knn` (no ids). ``exact``: always
    the exact search."""
    x = np.ascontiguousarray(feats, dtype=np.float32)
    n_ok = index.ntotal - (exclude[1] - exclude[0] if exclude else 0)
    k = min(k, n_ok)
    if k < 1:
        return np.zeros((len(x), 0), np.float32), np.zeros((len(x), 0), np.int64)
    if exclude is None and not exact:
        return flat_search(index, x, k, use=bounded)
    ivf = _ivf(index)
    if ivf is not None and not exact:
        params = faiss.SearchParametersIVF(sel=faiss.IDSelectorNot(faiss.IDSelectorRange(*exclude)), nprobe=int(ivf.nprobe))
        return index.search(x, k, params=params)
    return torch_knn(x, index, k, exclude=exclude), None


def search_excluding(index, feats: np.ndarray, k: int, exclude: tuple[int, int]) -> np.ndarray:
    """Squared L2 distances (M, k) of ``feats`` to their k nearest vectors of ``index`` (a faiss
    index or a :class:`ShardedIndex`) outside the ids ``exclude=(lo, hi)``: the calibration's
    search. IVF indexes use their own (approximate) search, as queries get, unless the visited
    cells held fewer than k other patches: then, like every other type, an exact search."""
    if isinstance(index, ShardedIndex):
        return index.search_excluding(feats, k, exclude)
    dist, ids = shard_search(index, feats, k, exclude=exclude)
    if ids is not None and (ids < 0).any():  # the visited cells held too few patches of other sources
        dist, _ = shard_search(index, feats, k, exclude=exclude, exact=True)
    return np.maximum(dist, 0.0)


class ShardedIndex:
    """Several faiss indexes of one type holding consecutive id ranges of one bank, searched in
    turn with the k nearest merged (the faiss calls a bank makes: ``search``, ``reconstruct_n``,
    ``ntotal``, ``d``). ``files``: where the shards lie on disk, when they do."""

    def __init__(self, shards: Sequence[faiss.Index], files: Sequence[str | os.PathLike] | None = None) -> None:
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        self.shards = list(shards)
        self.files = [Path(f) for f in files] if files is not None else None
        self.d = int(self.shards[0].d)
        self.offsets = np.concatenate([[0], np.cumsum([s.ntotal for s in self.shards])]).astype(np.int64)
        self.is_trained = True

    @property
    def ntotal(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def ivf(self) -> bool:
        return _ivf(self.shards[0]) is not None

    def set_nprobe(self, nprobe: int) -> None:
        for s in self.shards:
            set_nprobe(s, nprobe)

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        """Vectors ``start:start+n`` (decoded), across shard boundaries."""
        out = []
        for i, s in enumerate(self.shards):
            r = local_range((start, start + n), int(self.offsets[i]), s.ntotal)
            if r is not None:
                out.append(index_vectors(s, *r))
        return np.concatenate(out) if out else np.zeros((0, self.d), np.float32)

    def search(self, x: np.ndarray, k: int, params: faiss.SearchParameters | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(D, I)`` of the k nearest over every shard (global ids), as one index would answer
        (faiss's own search of each shard; a bank's searches use :meth:`search_nearest`)."""
        if params is not None and getattr(params, "sel", None) is not None:
            raise ValueError("ID selectors address one index's ids; use search_excluding on a sharded index")
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = []
        for i, s in enumerate(self.shards):
            kk = min(k, s.ntotal)
            d, ids = s.search(x, kk, params=params) if params is not None else s.search(x, kk)
            parts.append((d, np.where(ids >= 0, ids + self.offsets[i], -1)))
        return merge_nearest(parts, k)

    def search_nearest(self, x: np.ndarray, k: int, *, bounded: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(D, I)`` of the k nearest as a bank searches them: each shard by :func:`shard_search`
        (flat shards: the bounded search's distances and no ids, ``I`` None, as a one-index bank
        and the Dask workers get them; ``bounded`` as there), the k smallest merged."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = []
        for i, s in enumerate(self.shards):
            d, ids = shard_search(s, x, min(k, s.ntotal), bounded=bounded)
            parts.append((d, None if ids is None else np.where(ids >= 0, ids + self.offsets[i], -1)))
        return merge_nearest(parts, k)

    def search_excluding(self, feats: np.ndarray, k: int, exclude: tuple[int, int]) -> np.ndarray:
        """:func:`search_excluding` shard by shard (the same answer as one index's)."""
        ivf = self.ivf

        def run(exact: bool) -> tuple[np.ndarray, np.ndarray | None]:
            parts = []
            for i, s in enumerate(self.shards):
                loc = local_range(exclude, int(self.offsets[i]), s.ntotal)
                d, ids = shard_search(s, feats, k, exclude=loc, exact=exact or not ivf)
                if d.shape[1]:
                    parts.append((d, None if ids is None else np.where(ids >= 0, ids + self.offsets[i], -1)))
            return merge_nearest(parts, k)

        dist, ids = run(exact=False)
        if ids is not None and (ids < 0).any():
            dist, _ = run(exact=True)
        return np.maximum(dist, 0.0)


class ShardSink(IndexSink):
    """An :class:`~napari_mias_sam.bank.indexes.IndexSink` that writes shards of the given
    ``sizes`` into ``folder`` as they fill (one shard in memory at a time). SQ8 / IVF shards are
    copies of one trained empty index. ``files`` lists ``{"file", "ntotal"}`` of the shards written."""

    def __init__(self, d: int, index_type: str, expected: int, sizes: Sequence[int], folder: str | os.PathLike) -> None:
        super().__init__(d, index_type, expected)
        self.sizes = [int(s) for s in sizes]
        self.folder = Path(folder)
        self.files: list[dict] = []
        self._template: faiss.Index | None = None
        self._current: faiss.Index | None = None
        if self.index is not None:  # untrained types: the empty index is the template
            self._template, self.index = self.index, None

    @property
    def trained(self) -> bool:
        return self._template is not None

    def _after_training(self) -> None:
        self._template, self.index = self.index, None

    def _place(self, x: np.ndarray) -> None:
        while len(x):
            if len(self.files) >= len(self.sizes):
                raise ValueError(f"more vectors than the planned shards hold ({sum(self.sizes):,})")
            if self._current is None:
                self._current = faiss.clone_index(self._template)
                if "nprobe" in self.info:
                    set_nprobe(self._current, int(self.info["nprobe"]))
            room = self.sizes[len(self.files)] - self._current.ntotal
            self._current.add(x[:room])
            x = x[room:]
            if self._current.ntotal == self.sizes[len(self.files)]:
                self._write()

    def _write(self) -> None:
        from ..core.atomic_outputs import atomic_path

        name = shard_file_name(len(self.files), len(self.sizes))
        with atomic_path(self.folder / name) as tmp:
            faiss.write_index(self._current, str(tmp))
        self.files.append({"file": name, "ntotal": int(self._current.ntotal)})
        self._current = None

    def finish(self) -> list[dict]:  # type: ignore[override]
        """Write what is left; the shards written (their sizes are the planned ones)."""
        if not self.trained and self._buffered:
            self._train()
        if self._current is not None and self._current.ntotal:
            self._write()
        return self.files
