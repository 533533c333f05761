"""The settings of a segmentation run (a frozen dataclass that travels with the results) and how
unset ones become concrete. Preprocessing lives with the method (:mod:`..method.preprocess`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..core import defaults
from ..method.anomaly import NORMALISATIONS
from ..method.prompts import PROMPT_TYPES, default_mask_for, default_prompt_for

__all__ = ["VOLUME_PROMPT", "SegmentSettings", "resolve_defaults"]

#: The default prompt for volumes whatever the backbone, or ``None`` for the backbone's per-slice
#: prompt (``cog-box`` for LiteMedSAM, ``cog-point`` for SAM): ``regions``, one box per anomalous
#: 3D region with levels from the bank's normal calibration (:mod:`napari_mias_sam.method.regions`), the
#: winner of the development study (docs/results.md). 2D slice sets (BMAD PNGs) keep the paper's
#: per-slice prompt.
VOLUME_PROMPT: str | None = "regions"


@dataclass(frozen=True)
class SegmentSettings:
    """Settings of one segmentation run (the bank fixes backbone, layout and preprocessing).

    ``prompt=None`` means the default: :data:`VOLUME_PROMPT` for volumes when it is set, else the
    backbone's per-slice prompt (:data:`~napari_mias_sam.method.prompts.BACKBONE_PROMPTS`: ``cog-point`` for
    SAM, ``cog-box`` for LiteMedSAM). ``mask_index`` is 1-based as in the paper (3 = the finest mask);
    ``None`` means the prompt's default (3, or 1 for ``regions``). :func:`resolve_defaults` makes
    both concrete. The defaults come from :mod:`~napari_mias_sam.core.defaults`.
    """

    gamma: float = defaults.GAMMA
    mask_index: int | None = None
    prompt: str | None = None
    k: int = defaults.K
    sigma: float = defaults.SIGMA
    normalisation: str = defaults.NORMALISATION
    threshold: float = defaults.BASELINE_THRESHOLD  # used by the threshold-box ablation only
    slice_decision: bool = False
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not (self.gamma > 0 and self.gamma < 1e3):
            raise ValueError(f"gamma must be a number above 0 and below 1000 (the paper uses 5; larger values "
                             f"make the centre of gravity the map's maximum), got {self.gamma!r}")
        if self.mask_index is not None and self.mask_index not in (1, 2, 3):
            raise ValueError(f"mask index must be 1, 2 or 3, got {self.mask_index!r}")
        if self.prompt is not None and self.prompt not in PROMPT_TYPES:
            raise ValueError(f"prompt must be one of {', '.join(PROMPT_TYPES)}, got {self.prompt!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k!r}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {self.normalisation!r}"
            )

    def replace(self, **changes: Any) -> "SegmentSettings":
        return dataclasses.replace(self, **changes)

    def with_default_mask(self, prompt: str | None = None) -> "SegmentSettings":
        """These settings with an unset mask made the prompt's default (1 for regions, 3 otherwise);
        ``prompt`` stands in for an unset prompt. Unchanged when a mask is set or no prompt is known."""
        kind = self.prompt or prompt
        if self.mask_index is not None or kind is None:
            return self
        return self.replace(mask_index=default_mask_for(kind))


def resolve_defaults(settings: SegmentSettings, backbone_name: str, *, volume: bool = True,
                     regions_ok: bool = True) -> SegmentSettings:
    """``settings`` with a concrete prompt and mask: an unset prompt becomes :data:`VOLUME_PROMPT`
    for a volume whose bank supports it (``regions_ok``: a calibration with held-out normal peaks, see
    :func:`~napari_mias_sam.method.regions.regions_supported`), else the backbone's per-slice prompt; an
    unset mask becomes that prompt's default."""
    if settings.prompt is None:
        use_volume_prompt = volume and (regions_ok or VOLUME_PROMPT != "regions")
        settings = settings.replace(prompt=(VOLUME_PROMPT if use_volume_prompt else None) or default_prompt_for(backbone_name))
    return settings.with_default_mask()
