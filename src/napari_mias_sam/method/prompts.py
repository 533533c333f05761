"""Threshold-free prompts from an anomaly map: centre of gravity (point or moment box), maximum
point, and the paper's thresholded-box ablation. Coordinates are (x = column, y = row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from ..core.defaults import BASELINE_THRESHOLD, GAMMA, MASK_INDEX, REGIONS_MASK

__all__ = [
    "Prompt",
    "PromptRule",
    "PROMPT_RULES",
    "PROMPT_TYPES",
    "BACKBONE_PROMPTS",
    "default_prompt_for",
    "default_mask_for",
    "point_prompts_work",
    "cog_weights",
    "centre_of_gravity",
    "cog_point",
    "cog_box",
    "max_point",
    "threshold_boxes",
    "make_prompt",
]


@dataclass(frozen=True)
class Prompt:
    """A prompt in model-frame pixel coordinates (x = column, y = row, 0..255).

    ``kind`` is ``"point"`` (``point`` = (x, y), positive), ``"box"`` (``box`` = x0, y0, x1, y1),
    ``"boxes"`` (``boxes`` = (n, 4); each box is decoded and the masks are united) or ``"points"``
    (``points`` = (n, 2): one point per region piece, as the regions prompt records them; each is
    decoded on its own).
    """

    kind: str
    point: tuple[float, float] | None = None
    box: tuple[float, float, float, float] | None = None
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    points: tuple[tuple[float, float], ...] | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in {"kind": self.kind, "point": self.point, "box": self.box, "boxes": self.boxes,
                                  "points": self.points}.items() if v is not None}

    def centres(self) -> list[tuple[float, float]]:
        """Each point, or each box's centre (x, y), in order."""
        if self.kind == "point":
            return [self.point]  # type: ignore[list-item]
        if self.kind == "points":
            return list(self.points or ())
        boxes = [self.box] if self.kind == "box" else list(self.boxes or ())
        return [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]  # type: ignore[index]


def cog_weights(amap: np.ndarray, gamma: float) -> np.ndarray | None:
    """The centre of gravity's weights I^gamma / sum(I^gamma) (negative values clipped to 0);
    ``None`` for an all-zero, negative-only or non-finite map."""
    m = np.asarray(amap, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"anomaly map must be 2D, got shape {m.shape}")
    if not np.isfinite(m).all():
        return None
    m = np.clip(m, 0.0, None)
    top = m.max()
    if top <= 0:
        return None
    # I^gamma / sum(I^gamma) is unchanged by scaling I, so divide by the max first (no overflow).
    w = (m / top) ** gamma
    total = w.sum()
    return w / total if total > 0 else None


def centre_of_gravity(amap: np.ndarray, gamma: float = GAMMA) -> tuple[float, float] | None:
    """Eq. 2 of the paper: x_c = sum(j I^g) / sum(I^g), y_c = sum(i I^g) / sum(I^g).

    Returns ``None`` for an all-zero, negative-only or non-finite map (no prompt for that slice).
    """
    w = cog_weights(amap, gamma)
    if w is None:
        return None
    rows, cols = np.indices(w.shape)
    return float((w * cols).sum()), float((w * rows).sum())


cog_point = centre_of_gravity


def cog_box(amap: np.ndarray, gamma: float = GAMMA, *, n_sigma: float = 2.0, min_side: float = 4.0) -> tuple[float, float, float, float] | None:
    """Threshold-free box from the gamma-weighted moments: (x_c +/- n sigma_x, y_c +/- n sigma_y).

    Clipped to the map and at least ``min_side`` pixels on each side.
    """
    w = cog_weights(amap, gamma)
    if w is None:
        return None
    h, wd = w.shape
    rows, cols = np.indices(w.shape)
    xc, yc = (w * cols).sum(), (w * rows).sum()
    sx = np.sqrt(max((w * (cols - xc) ** 2).sum(), 0.0))
    sy = np.sqrt(max((w * (rows - yc) ** 2).sum(), 0.0))
    hx, hy = max(n_sigma * sx, min_side / 2), max(n_sigma * sy, min_side / 2)
    x0, x1 = max(0.0, xc - hx), min(wd - 1.0, xc + hx)
    y0, y1 = max(0.0, yc - hy), min(h - 1.0, yc + hy)
    return float(x0), float(y0), float(x1), float(y1)


def max_point(amap: np.ndarray) -> tuple[float, float] | None:
    """The pixel of maximum anomaly (paper ablation)."""
    m = np.asarray(amap, dtype=np.float64)
    if not np.isfinite(m).all() or m.max() <= 0:
        return None
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    return float(c), float(r)


def threshold_boxes(amap: np.ndarray, threshold: float = BASELINE_THRESHOLD) -> list[tuple[float, float, float, float]]:
    """Bounding boxes of the connected components of ``amap > threshold`` (paper ablation)."""
    m = np.asarray(amap)
    if not np.isfinite(m).all():
        return []
    lab, n = ndimage.label(m > threshold)
    boxes = []
    for sl in ndimage.find_objects(lab):
        if sl is None:
            continue
        r, c = sl
        boxes.append((float(c.start), float(r.start), float(c.stop - 1), float(r.stop - 1)))
    return boxes


def _cog_point(amap: np.ndarray, gamma: float, threshold: float) -> Prompt | None:
    p = centre_of_gravity(amap, gamma)
    return None if p is None else Prompt("point", point=p)


def _cog_box(amap: np.ndarray, gamma: float, threshold: float) -> Prompt | None:
    b = cog_box(amap, gamma)
    return None if b is None else Prompt("box", box=b)


def _max_point(amap: np.ndarray, gamma: float, threshold: float) -> Prompt | None:
    p = max_point(amap)
    return None if p is None else Prompt("point", point=p)


def _threshold_box(amap: np.ndarray, gamma: float, threshold: float) -> Prompt | None:
    boxes = threshold_boxes(amap, threshold)
    if not boxes:
        return None
    return Prompt("box", box=boxes[0]) if len(boxes) == 1 else Prompt("boxes", boxes=tuple(boxes))


def _per_volume(amap: np.ndarray, gamma: float, threshold: float) -> Prompt | None:
    raise ValueError("the regions prompt is made per volume, from its anomalous 3D regions "
                     "(pipeline.decode_all with the labels of regions.anomalous_regions), not from one map")


@dataclass(frozen=True)
class PromptRule:
    """One prompt type: its ``name`` (CLI, widget, results), the prompt ``shape`` it gives the
    decoder (``"point"`` or ``"box"``; threshold-box may give several boxes), the settings it
    ``reads`` (``"gamma"``, ``"threshold"``), a one-line ``description``, and the function
    ``make(amap, gamma, threshold) -> Prompt | None``. ``scope`` is ``"slice"`` for a rule made
    from one slice's map, ``"volume"`` for one made from the whole volume (``regions``: the
    pipeline makes it, :func:`make_prompt` refuses it). ``default_mask``: which of the decoder's
    three masks a run uses with this prompt when none is chosen (1-based; the paper's 3 for its
    per-slice prompts)."""

    name: str
    shape: str
    reads: tuple[str, ...]
    description: str
    make: Callable[[np.ndarray, float, float], Prompt | None]
    scope: str = "slice"
    default_mask: int = MASK_INDEX


#: Every prompt type, in the order the CLI, the widget and the evaluation's ablation list them.
#: Adding a prompt type is one function and one row here (and a test in tests/test_prompts.py).
PROMPT_RULES: dict[str, PromptRule] = {
    r.name: r
    for r in (
        PromptRule("regions", "box", ("calibration",),
                   "one box per anomalous 3D region (levels from the bank's normal calibration; volumes only)", _per_volume,
                   scope="volume", default_mask=REGIONS_MASK),
        PromptRule("cog-point", "point", ("gamma",), "gamma-weighted centre of gravity (Eq. 2 of the paper)", _cog_point),
        PromptRule("cog-box", "box", ("gamma",), "box of the gamma-weighted moments: centre +/- 2 sigma", _cog_box),
        PromptRule("max-point", "point", (), "the pixel of maximum anomaly (paper ablation)", _max_point),
        PromptRule("threshold-box", "box", ("threshold",), "boxes of the map's components above the threshold (paper ablation)",
                   _threshold_box),
    )
}
PROMPT_TYPES: tuple[str, ...] = tuple(PROMPT_RULES)


@dataclass(frozen=True)
class BackbonePrompts:
    """What a backbone's decoder was trained with: its default prompt type, and whether point
    prompts work (LiteMedSAM was trained with boxes only)."""

    default: str
    points_work: bool


#: Per-backbone prompt facts, by backbone name (``sam-vit_*`` share the ``sam`` row; any other
#: backbone, e.g. a test's fake, gets the ``sam`` row too).
BACKBONE_PROMPTS: dict[str, BackbonePrompts] = {
    "litemedsam": BackbonePrompts(default="cog-box", points_work=False),
    "sam": BackbonePrompts(default="cog-point", points_work=True),
}


def _backbone_row(backbone_name: str) -> BackbonePrompts:
    name = str(backbone_name)
    return BACKBONE_PROMPTS.get(name) or BACKBONE_PROMPTS["sam"]


def default_prompt_for(backbone_name: str) -> str:
    """The prompt type a run uses with this backbone when none is chosen."""
    return _backbone_row(backbone_name).default


def default_mask_for(prompt: str) -> int:
    """The decoder mask (1-based) a run uses with this prompt type when none is chosen."""
    rule = PROMPT_RULES.get(prompt)
    return rule.default_mask if rule is not None else MASK_INDEX


def point_prompts_work(backbone_name: str) -> bool:
    """Whether this backbone's decoder was trained with point prompts."""
    return _backbone_row(backbone_name).points_work


def make_prompt(amap: np.ndarray, kind: str, *, gamma: float = GAMMA, threshold: float = BASELINE_THRESHOLD) -> Prompt | None:
    """The prompt of type ``kind`` for one map, or ``None`` when the map gives none."""
    rule = PROMPT_RULES.get(kind)
    if rule is None:
        raise ValueError(f"unknown prompt type {kind!r}")
    return rule.make(amap, gamma, threshold)
