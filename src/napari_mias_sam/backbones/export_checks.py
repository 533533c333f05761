"""The fixed check image and the eager reference that the one-time checks of the CPU fast paths
(:mod:`.fast_cpu`: the exported encoder, OpenVINO, the box decoder) compare with."""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["check_input", "eager_reference", "max_diff"]


def check_input(input_size: int) -> torch.Tensor:
    """A fixed, image-like test input (smooth shapes and texture in [0, 1]) for verification."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, input_size), torch.linspace(-1, 1, input_size), indexing="ij")
    img = ((xx / 0.7) ** 2 + (yy / 0.85) ** 2 <= 1).float() * (0.55 + 0.2 * yy)
    img = img + 0.3 * ((xx - 0.2) ** 2 + (yy + 0.1) ** 2 <= 0.04).float()
    img = (img + 0.03 * torch.randn(input_size, input_size, generator=g)).clamp(0, 1)
    return img.expand(1, 3, -1, -1).contiguous()


#: Eager outputs of an encoder for the check input (and its mirror image), kept while the encoder
#: lives: the encoder's export, OpenVINO's check and the box decoder's export all compare with
#: them, and each eager forward costs 1.4-1.5 s on 2 cores (docs/performance.md, section 7).
_references: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_reference_lock = threading.Lock()


def eager_reference(encoder: torch.nn.Module, input_size: int, *, mirrored: bool = False) -> torch.Tensor:
    """The eager fp32 embedding (1, C, h, w) of :func:`check_input` (``mirrored``: of its left-right
    mirror image), computed once per encoder object: the one-time checks of the exported models
    share it instead of each running the encoder again."""
    with _reference_lock:  # (not fast_cpu._lock: the exports run under it)
        refs = _references.setdefault(encoder, {})
        key = (int(input_size), bool(mirrored))
        if key not in refs:
            x = check_input(input_size)
            with torch.inference_mode():
                refs[key] = encoder.eval()(x.flip(-1) if mirrored else x).detach().clone()
        return refs[key]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference between two tensors (as float32)."""
    return float((a.float() - b.float()).abs().max())
