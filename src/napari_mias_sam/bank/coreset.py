"""Approximate greedy k-center coreset subsampling of patch features (PatchCore style).

Greedy k-center selection picks, again and again, the feature farthest from everything picked so
far, so the kept subset covers the whole set: every dropped patch has a kept neighbour no farther
than the last pick's distance. To make it affordable the distances are computed on a random
projection of the features to ``project_dim`` dimensions (Johnson-Lindenstrauss: pairwise
distances are kept within a small factor); with ``project_dim=None``, or features already that
small, the selection is the exact greedy farthest-point order.

Cost: one (N x project_dim) matrix-vector product per pick, so O(N^2 * ratio * project_dim).
:func:`coreset_indices` runs on any torch device; a bank build applies it to each source group in
chunks of at most ``chunk`` patches (see :func:`napari_mias_sam.bank.build_bank`), which bounds
both the memory and the quadratic cost.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.progress import CancelFn

__all__ = ["DEFAULT_PROJECT_DIM", "coreset_size", "coreset_indices"]

DEFAULT_PROJECT_DIM = 128


def coreset_size(n: int, ratio: float) -> int:
    """How many of ``n`` patches a coreset with ``ratio`` keeps (at least 1 of a non-empty set)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio!r}")
    return 0 if n == 0 else min(n, max(1, int(math.ceil(n * ratio))))


@torch.inference_mode()
def coreset_indices(
    features: np.ndarray | torch.Tensor,
    ratio: float | None = None,
    *,
    n_select: int | None = None,
    project_dim: int | None = DEFAULT_PROJECT_DIM,
    start: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    cancelled: CancelFn | None = None,
) -> np.ndarray:
    """Indices (in pick order) of a greedy k-center coreset of ``features`` (N, D).

    Give ``ratio`` (fraction kept) or ``n_select``. ``start`` is the first pick (default: a
    seeded random patch, as PatchCore does). ``device``: where to compute (default: the
    features' device). Raises :class:`napari_mias_sam.core.errors.Cancelled` when ``cancelled()``.
    """
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    n, d = x.shape
    if n_select is None:
        if ratio is None:
            raise ValueError("give ratio or n_select")
        n_select = coreset_size(n, ratio)
    n_select = int(min(max(n_select, 0), n))
    if n_select == 0:
        return np.zeros(0, dtype=np.int64)
    if n_select == n:
        return np.arange(n, dtype=np.int64)
    dev = torch.device(device) if device is not None else x.device
    g = torch.Generator().manual_seed(seed)
    x = x.to(dev, dtype=torch.float32)
    if project_dim is not None and d > project_dim:
        # Gaussian random projection (variance 1/k keeps squared distances unbiased).
        proj = torch.randn(d, project_dim, generator=g).div_(math.sqrt(project_dim)).to(dev)
        x = x @ proj
    sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=g)) if start is None else int(start)
    if not 0 <= first < n:
        raise ValueError(f"start must be in [0, {n}), got {first}")
    picks = torch.empty(n_select, dtype=torch.int64, device=dev)
    picks[0] = first
    # min squared distance of every point to the picked set (clamped: rounding can go below 0)
    mind = (sq - 2.0 * (x @ x[first]) + sq[first]).clamp_(min=0.0)
    mind[first] = -1.0
    for i in range(1, n_select):
        if cancelled is not None and i % 1024 == 0 and cancelled():
            from ..core.errors import Cancelled

            raise Cancelled("coreset selection cancelled")
        j = torch.argmax(mind)
        picks[i] = j
        dj = (sq - 2.0 * (x @ x[j]) + sq[j]).clamp_(min=0.0)
        torch.minimum(mind, dj, out=mind)
        mind[j] = -1.0  # picked: never again (distances are >= 0)
    return picks.cpu().numpy()
