"""A fast, deterministic stand-in backbone for tests of the orchestration code (evaluation,
bank building). The real LiteMedSAM and SAM paths are tested elsewhere with real weights."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from napari_mias_sam.backbones.base import Decoded, Prompt


class FakeBackbone:
    """'Embeds' a frame as its 4x4-pooled intensities and local contrast (256 x 64 x 64);
    'decodes' a prompt to three discs of growing radius around the prompt centre."""

    name = "fake"
    weights_sha256 = "fake-weights"
    default_prompt = "cog-point"
    point_prompts_work = True
    precision = "fp32"

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.encode_calls = 0
        self.decode_calls = 0

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        x = F.avg_pool2d(frames[:, None].float(), 4)  # (N, 1, 64, 64)
        sq = F.avg_pool2d(frames[:, None].float() ** 2, 4)
        feats = torch.cat([x, sq], dim=1)
        return feats.repeat(1, 128, 1, 1)

    def decode(self, embedding: torch.Tensor, prompt: Prompt, mask_input=None) -> Decoded:
        self.decode_calls += 1
        if prompt.kind == "point":
            x, y = prompt.point
        else:
            boxes = [prompt.box] if prompt.kind == "box" else list(prompt.boxes)
            x = float(np.mean([(b[0] + b[2]) / 2 for b in boxes]))
            y = float(np.mean([(b[1] + b[3]) / 2 for b in boxes]))
        rr, cc = np.mgrid[:256, :256]
        d = np.hypot(rr - y, cc - x)
        logits = np.stack([r - d for r in (40.0, 20.0, 10.0)]).astype(np.float32)
        return Decoded(logits=logits, iou=np.array([0.5, 0.6, 0.7], np.float32))

    def describe(self) -> dict:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "architecture": "fake", "input_size": 256}
