"""5 x 5 patch features of 256 x 64 x 64 embeddings on a 32 x 32 grid (stride 2, zero padding 2).

Two layouts:

``paper1024``
    The reference code flattens each patch channel-major (256 x 25 = 6,400 values) and reduces it
    with 1-D adaptive average pooling to 1,024 values. 6,400 / 1,024 = 6.25, so output ``4c + q``
    is the mean of the 7 consecutive values ``[floor(6.25 q), ceil(6.25 (q + 1)))`` of channel
    ``c``'s flattened 5 x 5 window: a fixed depthwise 5 x 5 convolution with 4 kernels per channel.
``mean256``
    The plain 5 x 5 mean per channel (PatchCore style): 4x less memory and kNN time.
"""

from __future__ import annotations

import math

import torch

from ..core import defaults
import torch.nn.functional as F

__all__ = ["PATCH_LAYOUTS", "GRID", "PATCH", "feature_dim", "patch_features", "paper_kernels"]

#: The patch layouts (module docstring): the paper's 1,024-d and the PatchCore-style 256-d.
PATCH_LAYOUTS: tuple[str, ...] = ("paper1024", "mean256")
GRID = 32
PATCH = 5
_STRIDE = 2
_PAD = 2


def feature_dim(layout: str, channels: int = 256) -> int:
    if layout == "paper1024":
        return channels * 4
    if layout == "mean256":
        return channels
    raise ValueError(f"unknown patch layout {layout!r}; choose one of {', '.join(PATCH_LAYOUTS)}")


def paper_kernels(channels: int = 256, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Depthwise weights (4 C, 1, 5, 5) equal to the reference's adaptive 1-D pooling."""
    per_patch = PATCH * PATCH  # 25 values of one channel
    total_in, total_out = channels * per_patch, channels * 4
    k = torch.zeros(channels * 4, 1, per_patch, dtype=torch.float64)
    for q in range(4):
        # PyTorch adaptive pooling bins: start = floor(i * L / n), end = ceil((i + 1) * L / n)
        start = math.floor(q * total_in / total_out)
        end = math.ceil((q + 1) * total_in / total_out)
        k[q::4, 0, start:end] = 1.0 / (end - start)
    return k.reshape(channels * 4, 1, PATCH, PATCH).to(device=device, dtype=dtype)


def patch_features(embeddings: torch.Tensor, layout: str = defaults.PATCH_LAYOUT) -> torch.Tensor:
    """(N, C, 64, 64) embeddings -> (N, 1024, D) features, patches in row-major 32 x 32 order."""
    if embeddings.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) embeddings, got shape {tuple(embeddings.shape)}")
    n, c = embeddings.shape[:2]
    x = embeddings.float()
    if layout == "paper1024":
        w = paper_kernels(c, device=x.device)
        out = F.conv2d(x, w, stride=_STRIDE, padding=_PAD, groups=c)
    elif layout == "mean256":
        out = F.avg_pool2d(x, PATCH, stride=_STRIDE, padding=_PAD, count_include_pad=True)
    else:
        raise ValueError(f"unknown patch layout {layout!r}; choose one of {', '.join(PATCH_LAYOUTS)}")
    return out.flatten(2).transpose(1, 2).contiguous()
