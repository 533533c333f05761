"""The ``reference`` encoding: slices reach SAM exactly as the paper's reference code hands them over.

The reference code reads each slice as an 8-bit grey image, replicates it to 3 channels, resizes
it to 256 x 256 with PIL (bilinear, uint8 result), and gives that uint8 image to segment-anything's
``SamPredictor``, which resizes it again with PIL to 1024 x 1024 (bilinear, uint8), normalises it
with SAM's pixel mean and std, keeps the embedding in float32, and brings the decoder's 256 x 256
mask logits to 1024 and back to the image size with bilinear interpolation before thresholding.

The ``standard`` encoding (the product's default) resizes float intensities with torch and keeps
embeddings in float16: about 1 % apart in the embedding, which moves the finest mask by a few
percent of Dice. ``reference`` reproduces the reference bit for bit up to float rounding.

PIL resizes each channel of an 8-bit image with the same integer arithmetic, so one grey channel
is resized and replicated (identical to resizing the 3-channel image, and a third of the work).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ENCODINGS",
    "DEFAULT_ENCODING",
    "encoding_of",
    "embedding_dtype",
    "check_encoding",
    "to_uint8",
    "pil_resize",
    "reference_frames",
    "reference_sam_input",
    "reference_mask_logits",
]

#: ``standard``: float resize, float16 embeddings (fast, small cache); ``reference``: the paper's code.
ENCODINGS: tuple[str, ...] = ("standard", "reference")
DEFAULT_ENCODING = "standard"


def encoding_of(info_or_backbone) -> str:
    """The encoding recorded in a backbone description (dict) or carried by a backbone object
    (banks and backbones from before this setting existed are ``standard``)."""
    if isinstance(info_or_backbone, dict):
        return str(info_or_backbone.get("encoding", DEFAULT_ENCODING))
    return str(getattr(info_or_backbone, "encoding", DEFAULT_ENCODING))


def embedding_dtype(backbone) -> torch.dtype:
    """How a backbone's embeddings are kept between stages (and in the cache)."""
    return torch.float32 if encoding_of(backbone) == "reference" else torch.float16


def check_encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    return encoding


def to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Intensities in [0, 1] -> uint8 grey levels (round to nearest): exact for 8-bit PNG values / 255."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.rint(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def pil_resize(u8: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) uint8 -> (N, size, size) uint8 with PIL's bilinear filter (what
    ``torchvision.transforms.Resize`` and segment-anything's ``ResizeLongestSide`` do to PIL images)."""
    from PIL import Image

    out = np.empty((len(u8), size, size), dtype=np.uint8)
    for i, s in enumerate(u8):
        if s.shape == (size, size):
            out[i] = s
        else:
            out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(s), mode="L").resize((size, size), Image.BILINEAR))
    return out


def reference_frames(slices: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) in [0, 1] -> (N, size, size) float32 holding uint8 grey levels / 255: quantised to
    8 bits, zero-padded bottom/right to a square, resized with PIL (bilinear).

    The reference code pads non-square slices on both sides; every BMAD set is square (240 x 240,
    512 x 512), where the two agree exactly. Non-square slices keep the product's frame geometry.
    """
    u8 = to_uint8(slices)
    n, h, w = u8.shape
    side = max(h, w)
    if (h, w) != (side, side):
        u8 = np.pad(u8, ((0, 0), (0, side - h), (0, side - w)))
    return torch.from_numpy(pil_resize(u8, size).astype(np.float32) / 255.0)


def reference_sam_input(frames: torch.Tensor, size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> torch.Tensor:
    """(N, 256, 256) frames in [0, 1] -> (N, 3, size, size) SAM encoder input, as ``SamPredictor.set_image``
    builds it from the uint8 3-channel slice: PIL bilinear resize to ``size`` (uint8), then
    ``(x - pixel_mean) / pixel_std`` in float32."""
    big = torch.from_numpy(pil_resize(to_uint8(frames), size)).to(frames.device, dtype=torch.float32)
    x = big[:, None].expand(-1, 3, -1, -1)
    return ((x - pixel_mean.to(x.device)) / pixel_std.to(x.device)).contiguous()


def reference_mask_logits(low_res: torch.Tensor, input_size: int, frame: int) -> torch.Tensor:
    """Decoder logits (B, C, 256, 256) -> (B, C, frame, frame) the way ``Sam.postprocess_masks``
    brings them to the image: bilinear up to the encoder's input size, then down to the image."""
    x = F.interpolate(low_res, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=(frame, frame), mode="bilinear", align_corners=False)
