"""Segment Anything (vit_b / vit_l / vit_h) from a user-supplied checkpoint file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import WeightsError
from ..method.preprocess import FRAME
from ..method.reference_encoding import ENCODINGS, reference_mask_logits, reference_sam_input
from .weights import checkpoint_error
from .base import pick_device
from .sam_family import SamLikeBackbone

__all__ = ["SamBackbone", "SAM_VARIANTS"]

SAM_VARIANTS = ("vit_b", "vit_l", "vit_h")
_OFFICIAL_NAMES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}


class SamBackbone(SamLikeBackbone):
    """SAM image encoder (1024 x 1024 input) and decoder; point prompts as in the paper.

    ``checkpoint=None`` is only allowed with ``random_init_seed`` set: it builds the architecture
    with random weights (for structure tests and timing; the results mean nothing).

    ``encoding="reference"`` feeds the encoder exactly what the paper's reference code feeds it
    (uint8 slice resized to 1024 with PIL, float32 embeddings, masks brought to the frame through
    the 1024 grid as ``SamPredictor`` does; :mod:`napari_mias_sam.method.reference_encoding`). It needs fp32.
    """

    input_size = 1024

    def __init__(
        self,
        variant: str = "vit_b",
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        *,
        precision: str = "fp32",
        random_init_seed: int | None = None,
        encoding: str = "standard",
    ) -> None:
        if encoding not in ENCODINGS:
            raise WeightsError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
        if encoding == "reference" and precision != "fp32":
            raise WeightsError(f"the reference encoding keeps the encoder in fp32 as the paper's code does; "
                               f"drop --precision {precision} or use --encoding standard")
        self.encoding = encoding
        if variant not in SAM_VARIANTS:
            raise WeightsError(f"unknown SAM variant {variant!r}; choose one of {', '.join(SAM_VARIANTS)}")
        self.name = f"sam-{variant}"
        self.variant = variant
        if checkpoint is None and random_init_seed is None:
            from .weights import local_file

            checkpoint = local_file(self.name)  # fetched earlier with `mias-sam weights fetch sam-<variant>`
            if checkpoint is None:
                raise WeightsError(
                    f"SAM {variant} needs its weights file ({_OFFICIAL_NAMES[variant]}): run 'mias-sam weights fetch "
                    f"{self.name}' where there is internet, or download it by hand and pass --checkpoint PATH."
                )
        if checkpoint is not None:
            from .weights import weights_file

            # before building the model: a typo should not cost seconds
            path = weights_file(checkpoint, missing=(
                f"SAM {variant} weights file not found. Run 'mias-sam weights fetch {self.name}' or download "
                f"{_OFFICIAL_NAMES[variant]} from the segment-anything release page and pass its path."))
        self.weights_entry = None
        if checkpoint is not None:
            from .weights import check_checkpoint

            # a known file of another architecture is refused before the model is built; an unknown
            # file is used with a warning
            self.weights_entry, self.weights_sha256 = check_checkpoint(path, variant)
        from segment_anything import sam_model_registry  # slow import: after the cheap checks

        with torch.random.fork_rng(devices=[]):  # seed the random init without resetting the caller's RNG
            torch.manual_seed(random_init_seed or 0)
            net = sam_model_registry[variant](checkpoint=None)
        if checkpoint is not None:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise checkpoint_error(path, exc, f"SAM {variant}") from exc
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise WeightsError(
                    f"{path}: does not match the SAM {variant} architecture ({str(exc).splitlines()[0]}). "
                    "Is it a checkpoint of another variant (vit_b / vit_l / vit_h)?"
                ) from exc
            self.weights_path: Path | None = path
        else:
            self.weights_path = None
            self.weights_sha256 = f"random-init-seed-{random_init_seed}"
        super().__init__(net, pick_device(device), precision=precision)

    def _encoder_input(self, frames: torch.Tensor) -> torch.Tensor:
        if self.encoding == "reference":
            return reference_sam_input(frames, self.input_size, self.model.pixel_mean, self.model.pixel_std)
        # The reference feeds 256 x 256 grey slices as 0-255 RGB to SAM's 1024 resize and normalisation;
        # three sequences of a case (N, 3, 256, 256) fill the three channels instead.
        x = (frames if frames.ndim == 4 else frames[:, None].expand(-1, 3, -1, -1)) * 255.0
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        mean = self.model.pixel_mean.to(x.device)
        std = self.model.pixel_std.to(x.device)
        return ((x - mean) / std).contiguous()

    def _frame_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        if self.encoding == "reference":
            return reference_mask_logits(low_res, self.input_size, FRAME)
        return super()._frame_logits(low_res)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "architecture": f"Segment Anything {self.variant}",
            "weights_file": self.weights_path.name if self.weights_path else None,
            "weights_known_as": self.weights_entry.name if self.weights_entry else None,
            "weights_sha256": self.weights_sha256,
            "input_size": self.input_size,
            "encoding": self.encoding,
        }
