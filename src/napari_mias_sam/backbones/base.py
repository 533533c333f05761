"""The small interface every backbone implements (the prompt it decodes: :class:`..method.prompts.Prompt`)."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..method.prompts import Prompt

__all__ = ["Backbone", "Decoded", "DecodeStop", "DecodeStopped", "sha256_file", "pick_device"]


class DecodeStopped(Exception):
    """A decode ended early by its :class:`DecodeStop` (nothing was computed)."""


class DecodeStop:
    """Ends a decode in flight from another thread: :meth:`stop` calls what the decode registered
    with :meth:`attach` (ONNX Runtime's terminate flag: the run ends within an operator) and every
    later decode given this object raises :class:`DecodeStopped` at once. The viewer's prefetch
    uses it so that a user's change never waits on a speculative decode."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list = []
        self.stopped = False

    def attach(self, hook) -> bool:
        """Call ``hook()`` on :meth:`stop`; False (and no call) when already stopped."""
        with self._lock:
            if not self.stopped:
                self._hooks.append(hook)
            return not self.stopped

    def detach(self, hook) -> None:
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()


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
