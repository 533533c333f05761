"""Exact k-nearest-neighbour search that skips most of the bank: lower bounds from a PCA projection.

A patch's distance to a bank vector splits, in any orthonormal basis, into the part inside the
first ``m`` principal directions of the bank and the part outside them::

    ||q - x||^2 = ||P(q - x)||^2 + ||R(q - x)||^2  >=  ||Pq - Px||^2 + (||Rq|| - ||Rx||)^2 = LB(q, x)

(``P`` projects on the first ``m`` directions, ``R`` on the rest; the second term by the triangle
inequality). The bound costs ``m`` of the ``d`` multiply-adds of a distance (the bank's first 128
of 1,024 directions hold 95 % of its variance, measured on the bundled sample bank), and it is
tight: for each query, only the bank vectors whose bound is below its k-th smallest *exact*
distance can be among its k nearest, typically a dozen of 43,008 (same measurement). So
:class:`BoundedSearcher` computes the bounds for the whole bank, scores the ``candidates`` smallest
bounds of each query exactly (which gives an upper bound on its k-th distance), then every other
vector whose bound is under it (widening the candidates four-fold per round).

The scores are the very float32 values a full search computes
(:func:`~napari_mias_sam.bank.knn.torch_knn`: ``||x||^2 - 2 q.x + ||q||^2`` by ``torch.addmm``),
bit for bit: they come from the same BLAS matrix product, on blocks of 64 queries x the union of
their candidates (at least 64 bank vectors: a smaller bank or shard repeats one, masked), shapes
for which the BLAS kernel gives every element the bits of the full product
(:func:`gemm_identity_holds` checks this once per process; where it fails, callers search in full
or with faiss). The threshold allows for that product's rounding (at most about
``d 2^-24 |q| |x|``) and the bounds' own float32 rounding (:data:`MARGIN`), so every vector that
the full search's rounding could put among the k nearest is scored: the result equals the full
search's, bitwise (tests/bank/test_bounded_knn.py, on the sample bank and with shards), and a
distance's bits do not depend on which shard, block or batch holds its vector or query (torch_knn's
own products on fewer than about 8 queries or 12 bank vectors use other kernels, 1 ulp apart).

Used by default (``MIAS_SAM_BOUNDED_KNN=0`` turns it off everywhere) for the leave-one-source-out
calibration of a bank build (one search per held-out slice, its own source excluded by id range)
and for every CPU search of an exact (``flat``, float32, L2) index without exclusion
(:func:`flat_search`): a one-process bank's, each shard of a sharded bank's
(:func:`~napari_mias_sam.bank.shards.shard_search`, one process or a Dask worker, staged or not).
Since every path computes each distance with the same arithmetic (torch_knn's, bit for bit), the
k nearest of the shards, merged, are the one index's k nearest: byte-identical results. Where the
probe fails or the search is off, every one of these paths is faiss's own search (``index.search``),
as before, whose distances round differently from torch_knn's (about 1e-5); they still agree with
one another. GPU searches (faiss-gpu, :class:`~napari_mias_sam.bank.knn.TorchSearcher`) are not
affected. Memory: a searcher holds, next to the index it reads (no copy of the bank), the bounds'
vectors (``dims + 1`` floats per bank vector: an eighth of a 1,024-d bank) and the squared norms;
it is built on an index's first search (1-2 s for the 43,008 x 1,024 sample bank) and kept while
the index lives (:func:`searcher_for`).
"""

from __future__ import annotations

import os
import threading
import weakref

import faiss
import numpy as np
import torch

from .knn import index_vectors

__all__ = ["BoundedSearcher", "PCA_DIMS", "bank_matrix", "enabled", "ENV", "gemm_identity_holds", "gemm_rescore_exact",
           "exact_flat", "torch_arithmetic", "searcher_for", "flat_search"]

#: Environment variable: ``0`` turns the bounded search off (the calibration then searches in
#: full with torch_knn, a bank's CPU searches are faiss's); on by default for both.
ENV = "MIAS_SAM_BOUNDED_KNN"
#: The calibration searches banks smaller than this in full (the bounds would not pay).
MIN_BANK = 1024


def enabled(default: bool = True) -> bool:
    """Whether :class:`BoundedSearcher` is used: ``MIAS_SAM_BOUNDED_KNN`` set to 1/0, else ``default``
    (on: for calibration and for a bank's CPU searches of flat indexes)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return default

#: Principal directions used for the bounds (at most a quarter of the feature dimension).
PCA_DIMS = 128
#: Bank vectors sampled (evenly) to estimate the principal directions.
PCA_SAMPLE = 4096
#: Bank vectors per bound index segment (an excluded range skips whole segments).
SEGMENT = 16384
#: Candidate vector elements gathered at once for the exact distances (8 MiB: in cache).
EXACT_BLOCK = 1 << 21
#: Relative margin on the bounds against their own float32 rounding.
MARGIN = 1e-4


def bank_matrix(index: faiss.Index) -> np.ndarray:
    """The bank vectors (N, d) as float32: a view of an exact flat index's storage (no copy),
    else decoded (SQ8, fp16, IVF: a copy)."""
    n, d = int(index.ntotal), int(index.d)
    if isinstance(index, faiss.IndexFlat) and n:
        try:
            return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
        except (AttributeError, TypeError):
            pass
    return np.ascontiguousarray(index_vectors(index, 0, n), dtype=np.float32) if n else np.zeros((0, d), np.float32)


class BoundedSearcher:
    """Exact k-NN over fixed vectors (a faiss index or an (N, d) array) with PCA lower bounds.

    ``dims``: principal directions for the bounds (default :data:`PCA_DIMS`, at most d/4);
    ``candidates``: bank vectors per query whose exact distance is computed first;
    ``boundaries``: bank ids where an excluded range may start or end (the sources of a bank):
    the bounds are searched per segment between them (and every :data:`SEGMENT` vectors), so an
    excluded source is skipped whole. The bounds' own search is faiss's (exact, BLAS) on the
    ``dims + 1``-d vectors ``[Px, ||Rx||]``, whose squared distances are the bounds.
    """

    def __init__(self, source, *, dims: int = PCA_DIMS, candidates: int = 32, boundaries=()) -> None:
        x = bank_matrix(source) if isinstance(source, faiss.Index) else np.ascontiguousarray(source, dtype=np.float32)
        self.x = torch.from_numpy(x)
        self.n, self.d = x.shape
        self.candidates = int(candidates)
        self.m = int(max(1, min(dims, self.d // 4)))
        with torch.inference_mode():
            self.xn = (self.x * self.x).sum(1)  # squared norms, for the exact distances
            step = max(1, self.n // PCA_SAMPLE)
            sample = self.x[::step]
            self.mean32 = sample.double().mean(0).float()
            c = sample - self.mean32
            # the basis only sets how tight the bounds are (any orthonormal one gives valid bounds)
            cov = (c.T @ c) / max(1, len(c) - 1)
            _, vecs = torch.linalg.eigh(cov.float())
            self.basis = vecs[:, -self.m:].flip(1).float().contiguous()  # (d, m), largest variance first
            y = np.empty((self.n, self.m + 1), dtype=np.float32)
            for s in range(0, self.n, 65536):
                y[s : s + 65536] = self._project(self.x[s : s + 65536]).numpy()
        cuts = sorted({0, self.n, *(int(b) for b in boundaries if 0 < int(b) < self.n), *range(SEGMENT, self.n, SEGMENT)})
        self.segments: list[tuple[int, int, faiss.IndexFlatL2]] = []
        for a, b in zip(cuts, cuts[1:]):
            idx = faiss.IndexFlatL2(self.m + 1)
            idx.add(y[a:b])
            self.segments.append((a, b, idx))

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        """``[P(v - mean), ||R(v - mean)||]``: squared distances between these are the bounds."""
        c = v - self.mean32
        y = c @ self.basis
        rest = ((c * c).sum(1) - (y * y).sum(1)).clamp_min_(0).sqrt_()
        return torch.cat([y, rest[:, None]], 1)

    def _bound_knn(self, qy: np.ndarray, kk: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``kk`` smallest bounds of each query (and their bank ids; -1 past the end) outside ids lo:hi."""
        dists, ids = [], []
        for a, b, idx in self.segments:
            if lo <= a and b <= hi:
                continue  # wholly excluded
            if b <= lo or a >= hi:
                d, i = idx.search(qy, min(kk, b - a))
            else:  # partly excluded: faiss's ID filter (per-pair kernel, on this segment only)
                left = (b - a) - (min(b, hi) - max(a, lo))
                if left <= 0:
                    continue
                sel = faiss.IDSelectorNot(faiss.IDSelectorRange(max(a, lo) - a, min(b, hi) - a))
                d, i = idx.search(qy, min(kk, left), params=faiss.SearchParameters(sel=sel))
            dists.append(np.where(i >= 0, d, np.inf))
            ids.append(np.where(i >= 0, i + a, -1))
        d, i = np.concatenate(dists, 1), np.concatenate(ids, 1)
        if d.shape[1] > kk:
            part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
            d, i = np.take_along_axis(d, part, 1), np.take_along_axis(i, part, 1)
        return d, i

    @torch.inference_mode()
    def search(self, queries, k: int, *, exclude: tuple[int, int] | None = None) -> np.ndarray:
        """Squared L2 distances (M, k) of ``queries`` to their k nearest vectors, sorted, bank ids
        ``exclude=(lo, hi)`` left out: bit for bit what :func:`~napari_mias_sam.bank.knn.torch_knn`
        (a full float32 matrix-product search) returns, where :func:`gemm_identity_holds`."""
        q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32))
        lo, hi = exclude if exclude else (0, 0)
        lo, hi = max(0, int(lo)), min(self.n, int(hi))
        n_ok = self.n - max(0, hi - lo)
        k = min(int(k), n_ok)
        if k < 1:
            raise ValueError("no bank vectors left to search")
        qn = (q * q).sum(1)
        # a vector whose matrix-product distance is at most the k-th found has a true distance, so a
        # bound, at most that plus the product's rounding (slack) plus the bounds' own (MARGIN)
        slack = self._slack(qn)
        qy = np.ascontiguousarray(self._project(q).numpy())
        best = torch.empty((len(q), k), dtype=torch.float32)
        todo, kk = np.arange(len(q)), min(max(self.candidates, k), n_ok)
        while len(todo):
            bd, ids = self._bound_knn(qy[todo], kk, lo, hi)
            kth = gemm_rescore_exact(q, qn, self.x, self.xn, todo, ids, k, avoid=(lo, hi))
            best[todo] = kth
            last = kth[:, -1]
            thr = (last + slack[todo] + MARGIN * (last.abs() + qn[todo] + 1.0)).numpy()
            # a query is done when its kk-th smallest bound is above the threshold (every vector
            # that could be among its k nearest was scored) or every vector was scored
            more = (np.nanmax(np.where(np.isfinite(bd), bd, -np.inf), axis=1) <= thr) & (kk < n_ok)
            todo, kk = todo[more], min(kk * 4, n_ok)
        return best.clamp_min_(0).numpy()

    def _slack(self, qn: torch.Tensor) -> torch.Tensor:
        """Per query, a bound on |float32 matrix-product distance - true distance| for any bank vector:
        the dot product's error (at most g |q| |x| for d terms, g ~ d 2^-24) twice, and the norms'
        and sums' roundings."""
        u = 2.0**-24
        g = self.d * u / (1 - self.d * u)
        xmax = float(self.xn.max()) if self.n else 0.0
        return 2 * g * (qn * xmax).sqrt() + (g + 4 * u) * (qn + xmax)


def gemm_rescore_exact(q: torch.Tensor, qn: torch.Tensor, x: torch.Tensor, xn: torch.Tensor, rows: np.ndarray,
                       ids: np.ndarray, k: int, *, avoid: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """For queries ``q[rows]``, the k smallest of ``||x||^2 - 2 q.x + ||q||^2`` (sorted) over bank ids
    that include each one's ``ids`` (a row per query; -1 unused), computed as
    :func:`~napari_mias_sam.bank.knn.torch_knn` computes them: ``torch.addmm`` on blocks of
    :data:`GEMM_ROWS` queries and at least :data:`GEMM_COLS` bank vectors, shapes whose BLAS kernel
    gives each element the same bits as the full search's (:func:`gemm_identity_holds`). A block's
    columns are the union of its queries' ids (each value one the full search also computes),
    padded with the first bank ids; ids in ``avoid`` (the excluded range) count as infinitely far."""
    out = torch.empty((len(rows), k), dtype=torch.float32)
    first = np.arange(min(len(x), GEMM_COLS))
    for r0 in range(0, len(rows), GEMM_ROWS):
        blk = ids[r0 : r0 + GEMM_ROWS]
        cols = np.unique(blk[blk >= 0])
        if len(cols) < GEMM_COLS:
            cols = np.union1d(cols, first)
        real = len(cols)
        if real < GEMM_COLS:  # a bank (shard) of fewer vectors: repeat one, so the kernel is the probed one
            cols = np.concatenate([cols, np.full(GEMM_COLS - real, cols[0])])
        these = rows[r0 : r0 + GEMM_ROWS]
        full = np.concatenate([these, np.full(GEMM_ROWS - len(these), these[0])])
        ti, tc = torch.from_numpy(full), torch.from_numpy(cols)
        d = torch.addmm(xn[tc][None], torch.index_select(q, 0, ti), torch.index_select(x, 0, tc).T, beta=1.0, alpha=-2.0)
        d.add_(qn[ti][:, None])
        if avoid[0] < avoid[1]:
            d[:, torch.from_numpy((cols >= avoid[0]) & (cols < avoid[1]))] = float("inf")
        if real < len(cols):
            d[:, real:] = float("inf")
        out[r0 : r0 + len(these)] = d[: len(these)].topk(k, dim=1, largest=False).values
    return out


#: Query rows and (at least) bank columns per re-scoring product: BLAS gives small shapes other kernels.
GEMM_ROWS = 64
GEMM_COLS = 64
_IDENTITY: list[bool] = []


def gemm_identity_holds() -> bool:
    """Whether this process's BLAS gives the elements of a :data:`GEMM_ROWS` x :data:`GEMM_COLS`+
    product the same bits as those of a large one (checked once, on random data, at the thread
    count in use). False means :func:`gemm_rescore_exact` cannot promise torch_knn's bits."""
    if not _IDENTITY:
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1024, 1024, generator=g)
            x = torch.randn(8192, 1024, generator=g)
            xn, qn = (x * x).sum(1), (q * q).sum(1)
            ref = torch.addmm(xn[None], q, x.T, beta=1.0, alpha=-2.0).add_(qn[:, None])
            ok = True
            for r0, cols in ((0, torch.arange(GEMM_COLS)), (300, torch.arange(5, 8192, 97)), (960, torch.arange(1000, 3100))):
                qi = torch.arange(r0, r0 + GEMM_ROWS)
                d = torch.addmm(xn[cols][None], q[qi], x[cols].T, beta=1.0, alpha=-2.0).add_(qn[qi][:, None])
                ok &= bool(torch.equal(d, ref[qi][:, cols]))
        _IDENTITY.append(ok)
    return _IDENTITY[0]


def exact_flat(index) -> bool:
    """Whether ``index`` is an exact float32 L2 index on the CPU (``IndexFlatL2``, or ``IndexFlat``
    with the L2 metric; memory-mapped ones too): the indexes :func:`flat_search` answers."""
    return type(index) in (faiss.IndexFlatL2, faiss.IndexFlat) and int(index.metric_type) == faiss.METRIC_L2


def torch_arithmetic(index, use: bool | None = None) -> bool:
    """Whether a CPU search of ``index`` without exclusion returns torch_knn's distances (the
    bounded search) rather than faiss's: an exact flat index, the bounded search on (``use``, else
    :func:`enabled`), and this process's BLAS passing :func:`gemm_identity_holds`. The rule reads
    neither the query count nor the index size, so a shard and the whole bank get the same
    arithmetic."""
    return exact_flat(index) and (enabled() if use is None else bool(use)) and gemm_identity_holds()


_SEARCHERS: weakref.WeakKeyDictionary[faiss.Index, BoundedSearcher] = weakref.WeakKeyDictionary()
_SEARCHERS_LOCK = threading.Lock()


def searcher_for(index: faiss.Index, boundaries=()) -> BoundedSearcher:
    """The :class:`BoundedSearcher` of a flat ``index``, built on first use and kept while the index
    object lives (one per bank, per shard of a sharded bank, per shard a Dask worker opened): a bank
    built in this process is searched with the searcher its calibration built. ``boundaries`` (the
    sources' id ranges, which the calibration excludes whole) count only when it is built; they
    change the speed of excluding searches, never a result. It reads the index's own storage, so it
    must not outlive the index (the cache drops it with it)."""
    with _SEARCHERS_LOCK:
        s = _SEARCHERS.get(index)
        if s is None:
            s = _SEARCHERS[index] = BoundedSearcher(index, boundaries=boundaries)
        return s


def flat_search(index: faiss.Index, x: np.ndarray, k: int, *, use: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(D, I)`` of the k nearest vectors of ``index`` (a CPU faiss index) for each row of ``x``:
    where :func:`torch_arithmetic` holds, the bounded search's distances (torch_knn's, bit for bit,
    whatever the bank's size or the query count) and no ids (``None``); otherwise faiss's own
    search, distances and ids."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if torch_arithmetic(index, use):
        return searcher_for(index).search(x, k), None
    return index.search(x, k)
