"""Shared encode/decode logic for SAM-family models (SAM and LiteMedSAM share the decoder API)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import FRAME
from .base import Decoded, Prompt

__all__ = ["SamLikeBackbone"]


class SamLikeBackbone:
    """Base for models with ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` modules.

    Subclasses set ``model``, ``input_size`` (the encoder's square input side) and implement
    :meth:`_encoder_input`. Prompts arrive in the 256 x 256 model frame and are scaled to the
    encoder's input size; masks come back as 256 x 256 logits in the same frame.
    """

    name = "samlike"
    weights_sha256 = ""
    default_prompt = "cog-point"
    point_prompts_work = True
    input_size = FRAME

    def __init__(self, model: torch.nn.Module, device: torch.device, *, precision: str = "fp32") -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.precision = precision
        for p in self.model.parameters():
            p.requires_grad_(False)

    # -- encoding -------------------------------------------------------------------------
    def _encoder_input(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in ("bf16", "fp16") and self.device.type in ("cuda", "cpu"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        x = self._encoder_input(frames.to(self.device, dtype=torch.float32))
        with self._autocast():
            emb = self.model.image_encoder(x)
        return emb.float()

    # -- decoding -------------------------------------------------------------------------
    @property
    def _coord_scale(self) -> float:
        return self.input_size / FRAME

    def _prompt_tensors(self, prompt: Prompt):
        s = self._coord_scale
        dev = self.device
        if prompt.kind == "point":
            assert prompt.point is not None
            coords = torch.tensor([[prompt.point]], dtype=torch.float32, device=dev) * s
            labels = torch.ones((1, 1), dtype=torch.int64, device=dev)
            return (coords, labels), None
        if prompt.kind == "box":
            assert prompt.box is not None
            return None, torch.tensor([prompt.box], dtype=torch.float32, device=dev) * s
        if prompt.kind == "boxes":
            assert prompt.boxes
            return None, torch.tensor(prompt.boxes, dtype=torch.float32, device=dev) * s
        raise ValueError(f"unknown prompt kind {prompt.kind!r}")

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, prompt: Prompt, mask_input: torch.Tensor | None = None) -> Decoded:
        emb = embedding.to(self.device, dtype=torch.float32)
        if emb.ndim == 3:
            emb = emb[None]
        points, boxes = self._prompt_tensors(prompt)
        n = boxes.shape[0] if boxes is not None else 1
        masks = None
        if mask_input is not None:
            m = torch.as_tensor(mask_input, dtype=torch.float32, device=self.device).reshape(1, 1, *mask_input.shape[-2:])
            masks = m.expand(n, -1, -1, -1)
        pe = self.model.prompt_encoder
        sparse, dense = pe(points=points, boxes=boxes, masks=masks)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=emb,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        if low_res.shape[-1] != FRAME:
            low_res = F.interpolate(low_res, size=(FRAME, FRAME), mode="bilinear", align_corners=False)
        if n > 1:  # several boxes: unite the masks (max of logits), keep the best IoU per mask slot
            logits = low_res.max(dim=0).values
            ious = iou.max(dim=0).values
        else:
            logits, ious = low_res[0], iou[0]
        return Decoded(logits=logits.float().cpu().numpy(), iou=ious.float().cpu().numpy().astype(np.float32))
