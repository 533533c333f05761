"""Exact k-nearest-neighbour search by chunked matrix multiplication (torch).

Used where faiss is not the right tool: leave-one-source-out calibration (faiss's ID-selector
search skips its BLAS path), and GPUs without faiss-gpu (:class:`TorchSearcher` holds the bank on
the device). Bank vectors are read from the faiss index chunk by chunk, so the bank is never
copied whole into host memory.

Low precision (``dtype=torch.float16`` / ``bfloat16``): queries and bank vectors are first
centred on one common vector (the mean of the first bank chunk: distances do not change, but the
values that get rounded become much smaller, so the rounding errors do too), the distance matrix
comes from a low-precision matrix product, each bank chunk's ``k + rerank`` best candidates per
query are re-scored in fp32, and the k best of those are kept. The result is exact unless a true
neighbour ranks below ``k + rerank`` in the low-precision order.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from ..core import defaults

__all__ = ["index_vectors", "torch_knn", "TorchSearcher", "RERANK"]

#: Extra low-precision candidates per query and bank chunk that get an exact fp32 re-score.
RERANK = 16


def index_vectors(index: faiss.Index, start: int, stop: int) -> np.ndarray:
    """Vectors ``start:stop`` of a faiss index (decoded for scalar-quantised ones; IVF indexes
    get a direct map on first use)."""
    try:
        return index.reconstruct_n(start, stop - start)
    except RuntimeError:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            raise
        ivf.make_direct_map()
        return index.reconstruct_n(start, stop - start)


_OUT_DTYPE_OK: dict[str, bool] = {}


def _low_precision_scores(q_low: torch.Tensor, x_low: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """fp32 ``||x||^2 - 2 q.x`` from low-precision ``q_low``, ``x_low``: the product runs in
    low precision (tensor cores on a GPU) but is written in fp32, so large values lose nothing
    to a 16-bit output. Where torch has no such kernel (the CPU), the same rounded inputs are
    multiplied in fp32."""
    dev = q_low.device.type
    if _OUT_DTYPE_OK.get(dev, True):
        try:
            prod = torch.mm(q_low, x_low.T, out_dtype=torch.float32)
            _OUT_DTYPE_OK[dev] = True
            return prod.mul_(-2.0).add_(xn[None])
        except (TypeError, NotImplementedError, RuntimeError):
            _OUT_DTYPE_OK[dev] = False
    return torch.addmm(xn[None], q_low.float(), x_low.float().T, beta=1.0, alpha=-2.0)


def _chunk_best(
    q: torch.Tensor,
    qn: torch.Tensor,
    xb: torch.Tensor,
    xn: torch.Tensor,
    k: int,
    dtype: torch.dtype,
    *,
    low: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    excl: tuple[int, int] | None = None,
    rerank: int = RERANK,
) -> torch.Tensor:
    """(Q, <= k) smallest squared L2 distances of fp32 queries ``q`` to one bank chunk ``xb``.

    ``xb`` (C, D): the chunk as it is scored exactly (fp32; or a low-precision copy, cast to fp32
    for the candidates only); ``xn``, ``qn``: squared norms of ``xb`` and ``q`` (fp32 path).
    ``low``: ``(q_low, x_low, xn_low)``, the queries and chunk as ranked in low precision
    (centred, in ``dtype``) and the chunk's squared norms in that frame; default: centred on the
    chunk's mean here. ``excl``: chunk-local ids ``lo:hi`` left out.
    """
    c = xb.shape[0]
    n_ok = c - (excl[1] - excl[0] if excl else 0)
    if dtype == torch.float32:
        d = torch.addmm(xn[None], q, xb.float().T, beta=1.0, alpha=-2.0).add_(qn[:, None])
        if excl:
            d[:, excl[0] : excl[1]] = float("inf")
        return d.topk(min(k, n_ok), dim=1, largest=False).values
    if low is None:
        mu = xb.float().mean(0)
        xc = xb.float() - mu
        low = ((q - mu).to(dtype), xc.to(dtype), (xc * xc).sum(1))
    q_low, x_low, xn_low = low
    approx = _low_precision_scores(q_low, x_low, xn_low)  # ranks a query's candidates (||q||^2 is common)
    if excl:
        approx[:, excl[0] : excl[1]] = float("inf")
    kc = min(k + rerank, n_ok)
    cand = approx.topk(kc, dim=1, largest=False).indices  # (Q, kc)
    exact = ((q[:, None, :] - xb[cand].float()) ** 2).sum(-1)  # fp32 re-score of the winners
    return exact.topk(min(k, kc), dim=1, largest=False).values


def _merge(best: torch.Tensor | None, new: torch.Tensor, k: int) -> torch.Tensor:
    if best is None:
        return new
    both = torch.cat([best, new], 1)
    return both.topk(min(k, both.shape[1]), dim=1, largest=False).values


@torch.inference_mode()
def torch_knn(
    queries: np.ndarray | torch.Tensor,
    index: faiss.Index,
    k: int,
    *,
    exclude: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
    chunk: int = 65536,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Squared L2 distances (M, k) of ``queries`` to their k nearest vectors in ``index``.

    ``exclude=(lo, hi)`` leaves bank ids lo..hi-1 out (a source's own slices). With
    ``dtype=torch.float16/bfloat16`` the matmul runs in low precision and the winners of each
    chunk are re-ranked in fp32 exactly.
    """
    dev = torch.device(device)
    q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    qn = (q * q).sum(1)
    n = index.ntotal
    k_eff = min(k, n - (exclude[1] - exclude[0] if exclude else 0))
    if k_eff < 1:
        raise ValueError("no bank vectors left to search")
    best = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        if exclude and exclude[0] <= s and e <= exclude[1]:
            continue
        xb = torch.from_numpy(index_vectors(index, s, e)).to(dev)
        excl = None
        if exclude and exclude[0] < e and exclude[1] > s:
            excl = (max(exclude[0], s) - s, min(exclude[1], e) - s)
        best = _merge(best, _chunk_best(q, qn, xb, (xb * xb).sum(1), k_eff, dtype, excl=excl), k_eff)
    assert best is not None
    return best.clamp_min_(0).cpu().numpy()


class TorchSearcher:
    """A memory bank held on a torch device (a GPU without faiss-gpu), searched exactly.

    ``source``: the bank vectors (N, D) as a tensor/array, a faiss index (read ``read_chunk``
    vectors at a time, so host memory stays small), or an iterable of (n_i, D) blocks. They are
    stored once, centred (see the module docstring), in ``dtype`` (fp16 by default: half the
    memory, tensor-core speed) for the distance product; the exact fp32 re-score of the best
    candidates reads an fp32 copy when ``keep_fp32`` (default ``None``: when it fits in free
    device memory with room to spare), otherwise the low-precision copy (results are then exact
    for the bank as stored: centred and rounded to fp16, which loses less than a ``flat-fp16``
    bank).
    """

    def __init__(
        self,
        source,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.float16,
        keep_fp32: bool | None = None,
        chunk: int = 1 << 17,
        query_block: int = 4096,
        read_chunk: int = 1 << 18,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.query_block = int(query_block)
        self._keep = keep_fp32
        self._low: list[torch.Tensor] = []  # centred vectors in dtype
        self._lnorms: list[torch.Tensor] = []  # their squared norms (fp32), for the ranking
        self._f32: list[torch.Tensor] | None = None if dtype == torch.float32 or keep_fp32 is False else []
        self._norms: list[torch.Tensor] = []  # squared norms of the fp32 vectors (fp32 dtype only)
        self.mean: torch.Tensor | None = None
        if isinstance(source, faiss.Index):
            n = int(source.ntotal)
            parts = (torch.from_numpy(index_vectors(source, s, min(n, s + read_chunk))) for s in range(0, n, read_chunk))
        elif isinstance(source, (torch.Tensor, np.ndarray)):
            x = torch.as_tensor(source)
            parts = (x[s : s + read_chunk] for s in range(0, len(x), read_chunk))
        else:
            parts = iter(source)  # an iterable of (n_i, D) blocks, e.g. generated on the device
        self.ntotal, self.d = 0, 0
        buf: list[torch.Tensor] = []
        have = 0
        for part in parts:
            part = torch.as_tensor(part).to(self.device, dtype=torch.float32)
            if self.mean is None:
                self.mean = part.mean(0) if self.dtype != torch.float32 else torch.zeros(part.shape[1], device=self.device)
            self.ntotal += len(part)
            self.d = int(part.shape[1])
            buf.append(part)
            have += len(part)
            if have >= chunk:
                self._append(torch.cat(buf))
                buf, have = [], 0
        if buf:
            self._append(torch.cat(buf))
        if self._f32 is not None and len(self._f32) < len(self._low):
            self._f32 = None  # fp32 copies ran out of room part-way: re-score from the low copies

    def _append(self, x: torch.Tensor) -> None:
        if self.dtype == torch.float32:
            self._low.append(x)
            self._norms.append((x * x).sum(1))
            self._lnorms.append(self._norms[-1])
            return
        xc = x - self.mean
        lnorms = (xc * xc).sum(1)
        if self.dtype == torch.float16 and float(lnorms.max()) > 3.0e4:
            self.dtype = torch.bfloat16  # fp16 would overflow on values this large
            self._low = [t.to(torch.bfloat16) for t in self._low]
        self._low.append(xc.to(self.dtype))
        self._lnorms.append(lnorms)
        if self._f32 is not None:
            if self._keep is None and self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                if free < x.numel() * 4 * 3:  # keep room for the search's own buffers
                    self._f32 = None
                    return
            self._f32.append(x)

    @property
    def exact_fp32(self) -> bool:
        """True when re-scoring reads fp32 copies of the bank vectors (exact for the fp32 bank)."""
        return self._f32 is not None or self.dtype == torch.float32

    def nbytes(self) -> int:
        tensors = self._low + self._lnorms + (self._f32 or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def search(self, queries: np.ndarray | torch.Tensor, k: int = defaults.K, *, exclude: tuple[int, int] | None = None) -> np.ndarray:
        """Squared L2 distances (M, k) to the k nearest bank vectors (as :func:`torch_knn`)."""
        q_all = torch.as_tensor(queries).to(self.device, dtype=torch.float32)
        k_eff = min(k, self.ntotal - (exclude[1] - exclude[0] if exclude else 0))
        if k_eff < 1:
            raise ValueError("no bank vectors left to search")
        low_prec = self.dtype != torch.float32
        out = []
        for b0 in range(0, len(q_all), self.query_block):
            q = q_all[b0 : b0 + self.query_block]
            qc = q - self.mean if low_prec else q
            q_low = qc.to(self.dtype)
            q_exact = q if (self._f32 is not None or not low_prec) else qc  # the frame of what is re-scored
            qn = (q * q).sum(1)
            best = None
            s = 0
            for i, low in enumerate(self._low):
                e = s + len(low)
                if not (exclude and exclude[0] <= s and e <= exclude[1]):
                    excl = (max(exclude[0], s) - s, min(exclude[1], e) - s) if exclude and exclude[0] < e and exclude[1] > s else None
                    if low_prec:
                        full = self._f32[i] if self._f32 is not None else low
                        cd = _chunk_best(q_exact, qn, full, self._lnorms[i], k_eff, self.dtype,
                                         low=(q_low, low, self._lnorms[i]), excl=excl)
                    else:
                        cd = _chunk_best(q, qn, low, self._norms[i], k_eff, self.dtype, excl=excl)
                    best = _merge(best, cd, k_eff)
                s = e
            out.append(best.clamp_min_(0))
        return torch.cat(out).cpu().numpy()
