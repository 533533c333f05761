"""Backbones behind one interface: encode slices, decode a prompt to 3 masks + 3 IoUs."""

from __future__ import annotations

import os

import torch

from ..core import defaults
from ..core.errors import WeightsError
from .base import Backbone, Decoded, pick_device
from ..method.prompts import Prompt

__all__ = [
    "BACKBONES",
    "Backbone",
    "Decoded",
    "Prompt",
    "load_backbone",
    "pick_device",
    "default_prompt_for",
    "point_prompts_work_for",
    "iou_tracks_quality_for",
]

#: Backbone names (their prompt defaults: :data:`napari_mias_sam.method.prompts.BACKBONE_PROMPTS`).
BACKBONES = ("litemedsam", "sam-vit_b", "sam-vit_l", "sam-vit_h")
#: Decoders whose IoU head does not track mask quality (it reads about the same for empty, leaking
#: and good masks): what the viewer says about them before any weights are loaded.
_IOU_UNINFORMATIVE = frozenset({"litemedsam"})


def default_prompt_for(name: str) -> str:
    """The prompt type a run uses with this backbone (the table: :data:`..prompts.BACKBONE_PROMPTS`)."""
    from ..method.prompts import default_prompt_for as from_table

    return from_table(name)


def point_prompts_work_for(name: str) -> bool:
    """False for a backbone trained with box prompts only (the table: :data:`..prompts.BACKBONE_PROMPTS`)."""
    from ..method.prompts import point_prompts_work

    return point_prompts_work(name)


def iou_tracks_quality_for(name: str) -> bool:
    """False where the decoder's predicted IoU says nothing about the mask's quality (LiteMedSAM)."""
    return name not in _IOU_UNINFORMATIVE


def load_backbone(
    name: str = defaults.BACKBONE,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    precision: str = "fp32",
    random_init_seed: int | None = None,
    encoding: str = "standard",
) -> Backbone:
    """Build a backbone by name: ``litemedsam`` (bundled weights) or ``sam-vit_b|l|h`` (checkpoint).

    ``encoding="reference"`` (SAM only): the paper's reference code's encoder input and float32
    embeddings (see :mod:`napari_mias_sam.method.reference_encoding`)."""
    if name == "litemedsam":
        from .litemedsam import LiteMedSAM

        if encoding != "standard":
            raise WeightsError("the reference encoding reproduces the paper's SAM ViT code; LiteMedSAM has only the "
                               "standard encoding (use --backbone sam-vit_b with --checkpoint, or --encoding standard)")

        return LiteMedSAM(checkpoint, device, precision=precision)
    if name.startswith("sam-") and name in BACKBONES:
        from .sam import SamBackbone

        return SamBackbone(name[4:], checkpoint, device, precision=precision, random_init_seed=random_init_seed, encoding=encoding)
    raise WeightsError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
