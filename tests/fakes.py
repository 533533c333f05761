"""The tests' one stand-in backbone: deterministic, fast, CPU only. The real LiteMedSAM and SAM
paths are tested with real weights (tests/backbones/, tests/test_e2e.py)."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from napari_mias_sam.backbones.base import Decoded
from napari_mias_sam.method.prompts import Prompt

__all__ = ["FakeBackbone", "intensity_disc_fake"]


class FakeBackbone:
    """A SAM-like backbone that needs no weights.

    ``embedding="tanh"`` (default): the frame is 4x4 average-pooled to 64 x 64 and passed through a
    fixed per-channel affine map (drawn from ``seed``) and tanh, so embeddings depend smoothly and
    non-linearly on the pixels and equal frames give equal embeddings. ``"intensity"``: the pooled
    intensity and squared intensity, repeated to 256 channels.

    ``masks="boxes"`` (default): logits +10 inside the prompt's box (a point becomes squares of
    half-side 12/8/4 pixels for masks 1/2/3), -10 outside. ``"discs"``: ``radii[m] - distance`` to
    the prompt's centre (the mean of its boxes' centres). IoUs are always (0.5, 0.6, 0.7).

    Counters: ``calls`` and ``encode_calls`` (``encode`` calls), ``frames_encoded``, ``decode_calls``.
    ``delay``: seconds ``encode`` sleeps per frame (a slow encoder, for the Dask fault tests).
    """

    precision = "fp32"

    def __init__(self, name: str = "fake", sha: str = "fake-weights-0001", seed: int = 0, channels: int = 256, *,
                 embedding: str = "tanh", masks: str = "boxes", radii: tuple[float, float, float] = (40.0, 20.0, 10.0),
                 delay: float = 0.0) -> None:
        if embedding not in ("tanh", "intensity") or masks not in ("boxes", "discs"):
            raise ValueError(f"unknown fake backbone kind: embedding={embedding!r}, masks={masks!r}")
        g = torch.Generator().manual_seed(seed)
        self.name = name
        self.weights_sha256 = sha
        self.device = torch.device("cpu")
        self.embedding, self.masks, self.radii = embedding, masks, tuple(float(r) for r in radii)
        self.a = torch.randn(channels, generator=g) * 3.0
        self.b = torch.randn(channels, generator=g) * 0.5
        self.calls = self.encode_calls = self.frames_encoded = self.decode_calls = 0
        self.delay = float(delay)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.encode_calls += 1
        self.frames_encoded += len(frames)
        if self.delay:
            time.sleep(self.delay * len(frames))
        grey = frames.float().mean(1, keepdim=True) if frames.ndim == 4 else frames[:, None].float()  # sequences: their mean
        x = F.avg_pool2d(grey, 4)  # (N, 1, 64, 64)
        if self.embedding == "intensity":
            sq = F.avg_pool2d(grey ** 2, 4)
            return torch.cat([x, sq], dim=1).repeat(1, 128, 1, 1)
        return torch.tanh(self.a[None, :, None, None] * x + self.b[None, :, None, None])

    def decode(self, embedding: torch.Tensor, prompt: Prompt, mask_input=None) -> Decoded:
        self.decode_calls += 1
        assert tuple(embedding.shape[-3:]) == (256, 64, 64)
        logits = self._discs(prompt) if self.masks == "discs" else self._boxes(prompt)
        return Decoded(logits=logits, iou=np.array([0.5, 0.6, 0.7], np.float32))

    def _discs(self, prompt: Prompt) -> np.ndarray:
        if prompt.kind == "point":
            x, y = prompt.point
        else:
            boxes = [prompt.box] if prompt.kind == "box" else list(prompt.boxes)
            x = float(np.mean([(b[0] + b[2]) / 2 for b in boxes]))
            y = float(np.mean([(b[1] + b[3]) / 2 for b in boxes]))
        rr, cc = np.mgrid[:256, :256]
        d = np.hypot(rr - y, cc - x)
        return np.stack([r - d for r in self.radii]).astype(np.float32)

    def _boxes(self, prompt: Prompt) -> np.ndarray:
        logits = np.full((3, 256, 256), -10.0, np.float32)
        if prompt.kind == "point":
            x, y = prompt.point
            boxes = [[(x - h, y - h, x + h, y + h)] for h in (12, 8, 4)]
        else:
            bx = [prompt.box] if prompt.kind == "box" else list(prompt.boxes)
            boxes = [bx, bx, bx]
        for m in range(3):
            for x0, y0, x1, y1 in boxes[m]:
                r0, r1 = int(np.clip(np.floor(y0), 0, 255)), int(np.clip(np.ceil(y1), 0, 255))
                c0, c1 = int(np.clip(np.floor(x0), 0, 255)), int(np.clip(np.ceil(x1), 0, 255))
                logits[m, r0 : r1 + 1, c0 : c1 + 1] = 10.0
        return logits

    def describe(self) -> dict:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "architecture": f"test fake ({self.embedding}, {self.masks})",
                "input_size": 256}


def intensity_disc_fake() -> FakeBackbone:
    """The preset of the evaluation and PNG tests: pooled-intensity embeddings, disc masks of
    radius 40/20/10 (weights hash ``fake-weights``)."""
    return FakeBackbone(sha="fake-weights", embedding="intensity", masks="discs")
