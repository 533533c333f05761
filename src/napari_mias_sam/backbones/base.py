"""The small interface every backbone implements (the prompt it decodes: :class:`..method.prompts.Prompt`)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..method.prompts import Prompt

__all__ = ["Backbone", "Decoded", "sha256_file", "pick_device"]


@dataclass
class Decoded:
    """Decoder output for one slice: 3 mask logit maps in the frame and 3 predicted IoUs."""

    logits: np.ndarray  # (3, 256, 256) float32
    iou: np.ndarray  # (3,) float32


@runtime_checkable
class Backbone(Protocol):
    """Encode slices to 256 x 64 x 64 embeddings; decode one prompt to 3 masks + 3 IoUs."""

    name: str
    weights_sha256: str
    device: torch.device

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 256, 256) float in [0, 1] -> (N, 256, 64, 64) float32 on ``device``."""
        ...

    def decode(self, embedding: torch.Tensor, prompt: Prompt, mask_input: torch.Tensor | None = None) -> Decoded:
        """One (256, 64, 64) embedding and one prompt -> :class:`Decoded`."""
        ...

    def describe(self) -> dict:
        """Provenance recorded in banks and results (name, weights file and hash, architecture)."""
        ...


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else Apple MPS, else CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        from ..core.errors import MiasSamError

        raise MiasSamError(f"device {str(device)!r}: not a device; use auto, cpu, cuda, cuda:N or mps.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..core.errors import MiasSamError

        raise MiasSamError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto.")
    return dev
