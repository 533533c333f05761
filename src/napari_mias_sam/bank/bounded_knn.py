"""Exact k-nearest-neighbour search that skips most of the bank: lower bounds from a PCA projection.

A patch's distance to a bank vector splits, in any orthonormal basis, into the part inside the
first ``m`` principal directions of the bank and the part outside them::

    ||q - x||^2 = ||P(q - x)||^2 + ||R(q - x)||^2  >=  ||Pq - Px||^2 + (||Rq|| - ||Rx||)^2 = LB(q, x)

(``P`` projects on the first ``m`` directions, ``R`` on the rest; the second term by the triangle
inequality). The bound costs ``m`` of the ``d`` multiply-adds of a distance (the bank's first 128
of 1,024 directions hold 95 % of its variance, measured on the bundled sample bank), and it is
tight: for each query, only the bank vectors whose bound is below its k-th smallest *exact*
distance can be among its k nearest, typically a dozen of 43,008 (same measurement). So
:class:`BoundedSearcher` computes the bounds for the whole bank, the exact distances of the
``candidates`` smallest bounds (which gives an upper bound on the k-th distance), then the exact
distance of every other vector whose bound is under it. Every vector closer than the k-th exact
distance found is examined, so the result is the exact k nearest, as a full search finds them;
only the rounding of each distance differs: the distances found are computed from the float32
differences (``torch.cdist`` without its matrix-product shortcut), closer to the true values than a float32 matrix product's ``|q|^2 + |x|^2 - 2 q.x``
(faiss, :func:`~napari_mias_sam.bank.knn.torch_knn`: errors of about 1e-5 on the sample bank's
distances, which are of order 1; about 3e-7 here, against float64). A relative margin on the bounds
covers their own float32 rounding.

Used, where :func:`enabled` (``MIAS_SAM_BOUNDED_KNN=1``), for the leave-one-source-out calibration
of a bank build (one search per held-out slice, its own source excluded by id range) and for the CPU
search of exact (``flat``) banks. Off by default: the neighbours are the same, but the distances'
rounding differs from faiss's (about 1e-5), so a bank or a map made with it is not byte-identical to
one made by a sharded bank, a Dask worker or an earlier release.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import torch

from .knn import index_vectors

__all__ = ["BoundedSearcher", "PCA_DIMS", "bank_matrix", "enabled", "ENV"]

#: Environment variable that turns the bounded search on (``1``); off by default (see above).
ENV = "MIAS_SAM_BOUNDED_KNN"


def enabled() -> bool:
    """Whether calibration and large CPU searches of flat banks use :class:`BoundedSearcher`."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")

#: Principal directions used for the bounds (at most a quarter of the feature dimension).
PCA_DIMS = 128
#: Bank vectors sampled (evenly) to estimate the principal directions.
PCA_SAMPLE = 16384
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
            sample = self.x[::step].double()
            self.mean32 = sample.mean(0).float()
            cov = torch.cov(sample.T) if len(sample) > 1 else torch.zeros((self.d, self.d), dtype=torch.float64)
            _, vecs = torch.linalg.eigh(cov)
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

    def _exact(self, q: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """Squared distances of each query to its bank ids (nq, c), from the differences (not the
        dot product: no cancellation), in blocks that stay in cache; inf where the id is -1."""
        out = torch.empty(ids.shape, dtype=torch.float32)
        t = torch.from_numpy(np.maximum(ids, 0))
        step = max(1, EXACT_BLOCK // max(1, ids.shape[1] * self.d))
        for r in range(0, len(ids), step):
            xs = torch.index_select(self.x, 0, t[r : r + step].reshape(-1)).view(-1, ids.shape[1], self.d)
            d = torch.cdist(q[r : r + step, None, :], xs, compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
            out[r : r + step] = d.square_()
        return out.masked_fill_(torch.from_numpy(ids < 0), float("inf"))

    @torch.inference_mode()
    def search(self, queries, k: int, *, exclude: tuple[int, int] | None = None) -> np.ndarray:
        """Squared L2 distances (M, k) of ``queries`` to their k nearest vectors, sorted, exactly
        as a full search gives them (bank ids ``exclude=(lo, hi)`` left out)."""
        q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32))
        lo, hi = exclude if exclude else (0, 0)
        lo, hi = max(0, int(lo)), min(self.n, int(hi))
        n_ok = self.n - max(0, hi - lo)
        k = min(int(k), n_ok)
        if k < 1:
            raise ValueError("no bank vectors left to search")
        qn = (q * q).sum(1)
        qy = np.ascontiguousarray(self._project(q).numpy())
        kk = min(max(self.candidates, k), n_ok)
        bd, ids = self._bound_knn(qy, kk, lo, hi)
        best = self._exact(q, ids).topk(k, dim=1, largest=False).values
        todo = np.arange(len(q))
        while True:
            kth = best[todo, -1]
            thr = (kth + MARGIN * (kth.abs() + qn[todo] + 1.0)).numpy()
            # a query is done when its kk-th smallest bound is above the threshold (every vector
            # that could be closer was examined) or every vector was examined
            more = (np.nanmax(np.where(np.isfinite(bd), bd, -np.inf), axis=1) <= thr) & (kk < n_ok)
            todo = todo[more]
            if not len(todo):
                break
            kk = min(kk * 4, n_ok)
            bd, ids = self._bound_knn(qy[todo], kk, lo, hi)
            best[todo] = self._exact(q[todo], ids).topk(k, dim=1, largest=False).values
        return best.clamp_min_(0).numpy()
