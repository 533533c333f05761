"""Shared encode/decode logic for SAM-family models (SAM and LiteMedSAM share the decoder API)."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
import torch.nn.functional as F

from ..method.preprocess import FRAME
from .base import Decoded
from ..method.prompts import Prompt

__all__ = ["SamLikeBackbone"]


class SamLikeBackbone:
    """Base for models with ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` modules.

    Subclasses set ``model``, ``input_size`` (the encoder's square input side) and implement
    :meth:`_encoder_input`. Prompts arrive in the 256 x 256 model frame and are scaled to the
    encoder's input size; masks come back as 256 x 256 logits in the same frame.
    """

    name = "samlike"
    weights_sha256 = ""
    input_size = FRAME
    #: CPU fast path (see :mod:`.fast_cpu`): "auto", "onnx", "torch" or "off".
    fast = "off"
    #: How slices reach the encoder (:mod:`napari_mias_sam.method.reference_encoding`); only SAM offers ``reference``.
    encoding = "standard"

    @property
    def point_prompts_work(self) -> bool:
        """Whether this decoder was trained with point prompts (the table in :mod:`..prompts`)."""
        from ..method.prompts import point_prompts_work

        return point_prompts_work(self.name)

    def __init__(self, model: torch.nn.Module, device: torch.device, *, precision: str = "fp32") -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.precision = precision
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._fast_lock = threading.Lock()
        self._fast_fn = None
        self._fast_box = None
        #: Which encoder / single-box decoder implementation runs (set on first use).
        self.encoder_runtime = "PyTorch"
        self.decoder_runtime = "PyTorch"
        self._dense_pe: torch.Tensor | None = None

    # -- encoding -------------------------------------------------------------------------
    def _encoder_input(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in ("bf16", "fp16") and self.device.type in ("cuda", "cpu"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _fast_encoder(self):
        """The CPU fast path (built once, on the first encode), or None where it does not apply:
        a GPU, reduced precision, or ``fast == "off"``."""
        if self.fast == "off" or self.device.type != "cpu" or self.precision != "fp32":
            return None
        with self._fast_lock:
            if self._fast_fn is None:
                from .fast_cpu import cpu_encoder

                fn, what = cpu_encoder(self.model.image_encoder, name=self.name, weights_sha256=self.weights_sha256,
                                       input_size=self.input_size, mode=self.fast)
                self._fast_fn, self.encoder_runtime = (fn or False), what
            return self._fast_fn or None

    def _fast_box_decoder(self):
        """The CPU fast path for single-box decodes (built once, on first use), or None."""
        if self.fast in ("off", "torch") or self.device.type != "cpu":
            return None
        with self._fast_lock:
            if self._fast_box is None:
                from .fast_cpu import cpu_box_decoder

                fn, what = cpu_box_decoder(self.model, self._image_pe(), name=self.name, weights_sha256=self.weights_sha256,
                                           input_size=self.input_size, mode=self.fast)
                self._fast_box, self.decoder_runtime = (fn or False), what
            return self._fast_box or None

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        x = self._encoder_input(frames.to(self.device, dtype=torch.float32))
        fast = self._fast_encoder()
        if fast is not None:
            return fast(x).float()
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

    def _image_pe(self) -> torch.Tensor:
        """The prompt encoder's dense positional encoding (fixed for given weights: computed once)."""
        if self._dense_pe is None:
            self._dense_pe = self.model.prompt_encoder.get_dense_pe()
        return self._dense_pe

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, prompt: Prompt, mask_input: torch.Tensor | None = None) -> Decoded:
        emb = embedding.to(self.device, dtype=torch.float32)
        if emb.ndim == 3:
            emb = emb[None]
        points, boxes = self._prompt_tensors(prompt)
        n = boxes.shape[0] if boxes is not None else 1
        fast = self._fast_box_decoder() if (prompt.kind == "box" and mask_input is None) else None
        if fast is not None:
            low_res, iou = fast(emb, boxes)
        else:
            masks = None
            if mask_input is not None:
                m = torch.as_tensor(mask_input, dtype=torch.float32, device=self.device).reshape(1, 1, *mask_input.shape[-2:])
                masks = m.expand(n, -1, -1, -1)
            pe = self.model.prompt_encoder
            sparse, dense = pe(points=points, boxes=boxes, masks=masks)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=emb,
                image_pe=self._image_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
        return self._decoded(low_res, iou)

    def _decoded(self, low_res: torch.Tensor, iou: torch.Tensor) -> Decoded:
        low_res = self._frame_logits(low_res)
        if low_res.shape[0] > 1:  # several boxes: unite the masks (max of logits), keep the best IoU per mask slot
            logits = low_res.max(dim=0).values
            ious = iou.max(dim=0).values
        else:
            logits, ious = low_res[0], iou[0]
        return Decoded(logits=logits.float().cpu().numpy(), iou=ious.float().cpu().numpy().astype(np.float32))

    @torch.inference_mode()
    def decode_many(self, embedding: torch.Tensor, prompts: list[Prompt]) -> list[Decoded]:
        """One decode per prompt on one embedding (the region pieces of a slice), each equal to
        :meth:`decode`'s bit for bit: single boxes on the CPU's ONNX decoder run side by side
        (:meth:`~.fast_cpu.OnnxBoxDecoder.run_many`), anything else one after the other."""
        fast = (self._fast_box_decoder() if len(prompts) > 1 and all(p is not None and p.kind == "box" for p in prompts)
                else None)
        if fast is None or not hasattr(fast, "run_many"):
            return [self.decode(embedding, p) for p in prompts]
        emb = embedding.to(self.device, dtype=torch.float32)
        if emb.ndim == 3:
            emb = emb[None]
        outs = fast.run_many(emb, [self._prompt_tensors(p)[1] for p in prompts])
        return [self._decoded(low_res, iou) for low_res, iou in outs]

    @torch.inference_mode()
    def decode_one_thread(self, embedding: torch.Tensor, prompt: Prompt, stop=None) -> Decoded:
        """:meth:`decode`'s output, bit for bit, on one core where the CPU's ONNX decoder takes the
        prompt (one box: a single-thread session, which ``stop``, a
        :class:`~.base.DecodeStop`, can end at once); anything else is :meth:`decode` itself."""
        fast = self._fast_box_decoder() if (prompt is not None and prompt.kind == "box") else None
        if fast is None or not hasattr(fast, "run_one_thread"):
            return self.decode(embedding, prompt)
        emb = embedding.to(self.device, dtype=torch.float32)
        if emb.ndim == 3:
            emb = emb[None]
        return self._decoded(*fast.run_one_thread(emb, self._prompt_tensors(prompt)[1], stop=stop))

    def _frame_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """The decoder's low-resolution mask logits in the 256 x 256 frame."""
        if low_res.shape[-1] != FRAME:
            low_res = F.interpolate(low_res, size=(FRAME, FRAME), mode="bilinear", align_corners=False)
        return low_res

    @staticmethod
    def batchable(prompt: Prompt | None) -> bool:
        """Prompts :meth:`decode_batch` decodes together (one point or one box each)."""
        return prompt is not None and prompt.kind in ("point", "box")

    @torch.inference_mode()
    def decode_batch(self, embeddings: torch.Tensor, prompts: list[Prompt]) -> list[Decoded]:
        """Decode B slices at once, one prompt each: ``embeddings`` (B, 256, 64, 64).

        Slices whose prompts are not all single points, or all single boxes, are decoded one at
        a time (:meth:`decode`). The batched pass is the mask decoder's own computation with the
        batch on the first axis (each slice pairs with its own prompt), so each slice's result
        equals :meth:`decode`'s up to float rounding.
        """
        kinds = {p.kind for p in prompts}
        if len(prompts) < 2 or len(kinds) != 1 or not all(self.batchable(p) for p in prompts):
            return [self.decode(e, p) for e, p in zip(embeddings, prompts)]
        s, dev = self._coord_scale, self.device
        emb = embeddings.to(dev, dtype=torch.float32)
        if kinds == {"point"}:
            coords = torch.tensor([[p.point] for p in prompts], dtype=torch.float32, device=dev) * s
            points, boxes = (coords, torch.ones((len(prompts), 1), dtype=torch.int64, device=dev)), None
        else:
            points, boxes = None, torch.tensor([p.box for p in prompts], dtype=torch.float32, device=dev) * s
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, iou = _predict_masks_batched(self.model.mask_decoder, emb, self._image_pe(), sparse, dense)
        low_res = self._frame_logits(low_res)
        logits = low_res.float().cpu().numpy()
        ious = iou.float().cpu().numpy().astype(np.float32)
        return [Decoded(logits=logits[i], iou=ious[i]) for i in range(len(prompts))]


def _predict_masks_batched(md, emb: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
    """SAM's ``MaskDecoder.predict_masks`` + multimask selection for B images with one prompt
    each (the original repeats every image for every prompt, which pairs B images with B**2)."""
    b = emb.shape[0]
    output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    src = emb + dense
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = md.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + md.num_mask_tokens), :]
    src = src.transpose(1, 2).reshape(b, c, h, w)
    up = md.output_upscaling(src)
    hyper_in = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(md.num_mask_tokens)], dim=1)
    _, c2, h2, w2 = up.shape
    masks = (hyper_in @ up.reshape(b, c2, h2 * w2)).reshape(b, -1, h2, w2)
    iou_pred = md.iou_prediction_head(iou_token_out)
    return masks[:, 1:], iou_pred[:, 1:]  # multimask output: the 3 masks after the single-mask one
