"""Exact k-nearest-neighbour search by chunked matrix multiplication (torch).

Used where faiss is not the right tool: leave-one-source-out calibration (faiss's ID-selector
search skips its BLAS path), and GPUs without faiss-gpu. Bank vectors are read from the faiss
index chunk by chunk, so the bank is never copied whole.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

__all__ = ["index_vectors", "torch_knn"]


def index_vectors(index: faiss.Index, start: int, stop: int) -> np.ndarray:
    """Vectors ``start:stop`` of a flat faiss index (decoded for scalar-quantised ones)."""
    return index.reconstruct_n(start, stop - start)


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
    ``dtype=torch.float16/bfloat16`` the matmul runs in low precision and the k winners of each
    chunk are re-ranked in fp32 exactly.
    """
    dev = torch.device(device)
    q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    qn = (q * q).sum(1, keepdim=True)
    n = index.ntotal
    k_eff = min(k, n - (exclude[1] - exclude[0] if exclude else 0))
    if k_eff < 1:
        raise ValueError("no bank vectors left to search")
    best_d = torch.full((len(q), k_eff), float("inf"), device=dev)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        if exclude and exclude[0] <= s and e <= exclude[1]:
            continue
        xb = torch.from_numpy(index_vectors(index, s, e)).to(dev)
        if dtype == torch.float32:
            d = qn - 2.0 * (q @ xb.T) + (xb * xb).sum(1)[None]
        else:
            approx = qn.to(dtype) - 2.0 * (q.to(dtype) @ xb.to(dtype).T) + (xb * xb).sum(1)[None].to(dtype)
            cand = approx.float().topk(min(k_eff + 4, e - s), dim=1, largest=False).indices
            exact = ((q[:, None, :] - xb[cand]) ** 2).sum(-1)  # fp32 re-rank of the winners
            d = torch.full((len(q), e - s), float("inf"), device=dev).scatter_(1, cand, exact)
        if exclude and exclude[0] < e and exclude[1] > s:
            lo, hi = max(exclude[0], s) - s, min(exclude[1], e) - s
            d[:, lo:hi] = float("inf")
        kk = min(k_eff, d.shape[1])
        cd = d.topk(kk, dim=1, largest=False).values
        best_d = torch.cat([best_d, cd], 1).topk(k_eff, dim=1, largest=False).values
    return best_d.clamp_min_(0).cpu().numpy()
