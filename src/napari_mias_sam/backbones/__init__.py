"""Backbones behind one interface: encode slices, decode a prompt to 3 masks + 3 IoUs."""

from __future__ import annotations

import os

import torch

from ..errors import WeightsError
from .base import Backbone, Decoded, Prompt, pick_device

__all__ = ["BACKBONES", "Backbone", "Decoded", "Prompt", "load_backbone", "pick_device"]

#: Backbone names (their prompt defaults: :data:`napari_mias_sam.prompts.BACKBONE_PROMPTS`).
BACKBONES = ("litemedsam", "sam-vit_b", "sam-vit_l", "sam-vit_h")


def load_backbone(
    name: str = "litemedsam",
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    precision: str = "fp32",
    random_init_seed: int | None = None,
    encoding: str = "standard",
) -> Backbone:
    """Build a backbone by name: ``litemedsam`` (bundled weights) or ``sam-vit_b|l|h`` (checkpoint).

    ``encoding="reference"`` (SAM only): the paper's reference code's encoder input and float32
    embeddings (see :mod:`napari_mias_sam.reference_io`)."""
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
