"""MIAS-SAM inside each anomalous region piece: the prompt and the mask each piece keeps.

:mod:`.regions` says *where* and *how many* prompts a slice gets (one per 2D piece of a 3D
region found with the bank's normal levels). Inside each piece the prompt is the paper's
**gamma-weighted centre of gravity** of the map (Eq. 2 restricted to the piece): a point for SAM
backbones; for LiteMedSAM, which takes boxes, a box centred on it whose half-sides are
:data:`BOX_SIGMAS` gamma-weighted standard deviations plus :data:`BOX_PAD` (gamma moves both the
centre and the size).

The decoder's mask must agree with the map (label-free rule, chosen on the development split,
docs/results.md): a mask agrees when the Dice of its part inside the piece with the piece's core
(the piece's pixels above the seed level; the piece where it has none) is at least
:data:`AGREEMENT_MIN`. The mask asked for is kept if it agrees, else the best-agreeing of the
three if one does, else the piece itself (outcome ``"region"``). Masks are clipped to their piece.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from .prompts import Prompt, cog_weights
from ..core.defaults import GAMMA

__all__ = ["RegionPrompt", "RegionDecode", "piece_moments", "moment_box", "region_prompts", "region_pieces",
           "mask_agreement", "choose_mask", "regions_prompt", "decode_regions", "BOX_SIGMAS", "BOX_PAD",
           "AGREEMENT_MIN", "REGION_OUTCOME"]

Box = tuple[float, float, float, float]


def _box_of(sl: tuple[slice, slice]) -> Box:
    """A ``find_objects`` slice as an inclusive (x0, y0, x1, y1) box."""
    r, c = sl
    return (float(c.start), float(r.start), float(c.stop - 1), float(r.stop - 1))


#: A box prompt (LiteMedSAM) reaches this many gamma-weighted standard deviations of the map inside
#: its piece each side of the piece's centre of gravity ...
BOX_SIGMAS = 2.0
#: ... plus this margin (frame px), and at least :data:`BOX_MIN_HALF` px.
BOX_PAD = 8.0
BOX_MIN_HALF = 4.0
#: A decoder mask agrees with its region when the Dice of the mask (inside the piece) with the
#: piece's core is at least this (label-free: the core is where the calibrated map is above the
#: seed level). Chosen on the development split among 0.1-0.7 and three agreement measures.
AGREEMENT_MIN = 0.4
#: The outcome code of a piece whose masks all disagree with the map: the piece itself is the mask.
REGION_OUTCOME = 0


@dataclass(frozen=True)
class RegionPrompt:
    """One region piece on one slice and the prompt made from it: ``centre`` is the gamma-weighted
    centre of gravity of the map inside the piece (x, y), ``prompt`` the point at it (SAM) or the box
    of the weighted moments centred on it (LiteMedSAM); ``extent_box`` is the piece's own bounding
    box, ``peak`` and ``area`` its maximum and size."""

    label: int
    centre: tuple[float, float]
    prompt: Prompt
    peak: float
    area: int
    extent_box: Box
    piece: np.ndarray = field(repr=False, compare=False, default=None)  # type: ignore[assignment]  # (H, W) bool


def piece_moments(map_2d: np.ndarray, piece: np.ndarray, gamma: float) -> tuple[float, float, float, float] | None:
    """(x_c, y_c, sigma_x, sigma_y) of the weights I^gamma of the map inside ``piece`` (Eq. 2 of the
    paper restricted to the piece); None when the map is zero there."""
    w = cog_weights(np.where(piece, map_2d, 0.0), gamma)
    if w is None:
        return None
    rows, cols = np.indices(w.shape)
    xc, yc = float((w * cols).sum()), float((w * rows).sum())
    sx = math.sqrt(max(float((w * (cols - xc) ** 2).sum()), 0.0))
    sy = math.sqrt(max(float((w * (rows - yc) ** 2).sum()), 0.0))
    return xc, yc, sx, sy


def moment_box(xc: float, yc: float, sx: float, sy: float, shape: tuple[int, int], *, n_sigma: float = BOX_SIGMAS,
               pad: float = BOX_PAD, min_half: float = BOX_MIN_HALF) -> Box:
    """(x_c +/- (n sigma_x + pad), y_c +/- (n sigma_y + pad)), each half at least ``min_half`` and
    shrunk symmetrically to stay inside the frame: the box's centre is the centre of gravity."""
    h, w = shape
    hx = min(max(n_sigma * sx, min_half) + pad, xc, w - 1.0 - xc)
    hy = min(max(n_sigma * sy, min_half) + pad, yc, h - 1.0 - yc)
    return (xc - hx, yc - hy, xc + hx, yc + hy)


def region_prompts(labels_2d: np.ndarray, map_2d: np.ndarray, *, gamma: float = GAMMA, kind: str = "box",
                   n_sigma: float = BOX_SIGMAS, pad: float = BOX_PAD) -> list[RegionPrompt]:
    """One prompt per region piece present on this slice (each 2D piece of a label), most anomalous
    first: ``kind`` ``"point"`` (the piece's gamma-weighted centre of gravity) or ``"box"``
    (:func:`moment_box` around it)."""
    if kind not in ("point", "box"):
        raise ValueError(f"region prompts are points or boxes, got {kind!r}")
    out: list[RegionPrompt] = []
    shape = labels_2d.shape
    for lab, piece, sl in region_pieces(labels_2d):
        mo = piece_moments(map_2d, piece, gamma)
        if mo is None:
            continue
        xc, yc, sx, sy = mo
        prompt = (Prompt("point", point=(xc, yc)) if kind == "point"
                  else Prompt("box", box=moment_box(xc, yc, sx, sy, shape, n_sigma=n_sigma, pad=pad)))
        out.append(RegionPrompt(lab, (xc, yc), prompt, float(map_2d[piece].max()), int(piece.sum()), _box_of(sl), piece))
    out.sort(key=lambda r: -r.peak)
    return out


def mask_agreement(mask: np.ndarray, piece: np.ndarray, core: np.ndarray | None = None) -> float:
    """How well a decoder mask agrees with its region: the Dice of the mask's part inside the
    piece with the piece's core (``core``: pixels above the seed level; the piece itself where
    the piece holds none, or without ``core``). 0 for an empty mask."""
    target = piece & core if core is not None and (piece & core).any() else piece
    inside = mask & piece
    total = int(inside.sum()) + int(target.sum())
    return 2.0 * int((inside & target).sum()) / total if total else 0.0


def choose_mask(masks: np.ndarray, piece: np.ndarray, preferred: int, *, core: np.ndarray | None = None,
                minimum: float = AGREEMENT_MIN) -> tuple[np.ndarray, int, float]:
    """The mask a piece keeps when ``preferred`` (1-3) is asked for: that decoder mask if it agrees
    with the region (:func:`mask_agreement` >= ``minimum``), else the best-agreeing of the three if
    one does, else the piece itself. Masks are clipped to the piece. Returns (mask, outcome: the
    mask used, 1-3, or :data:`REGION_OUTCOME`, its agreement)."""
    ag = [mask_agreement(masks[i], piece, core) for i in range(3)]
    pick = preferred - 1
    if ag[pick] < minimum:
        best = int(np.argmax(ag))
        if ag[best] < minimum:
            return piece.copy(), REGION_OUTCOME, float(ag[best])
        pick = best
    return masks[pick] & piece, pick + 1, float(ag[pick])


def region_pieces(labels_2d: np.ndarray) -> list[tuple[int, np.ndarray, tuple[slice, slice]]]:
    """Each 2D piece of each region label on one slice: (label, bool mask (frame), bounding slices)."""
    out = []
    for lab in np.unique(labels_2d):
        if lab == 0:
            continue
        pieces, _ = ndimage.label(labels_2d == lab)
        for i, sl in enumerate(ndimage.find_objects(pieces), start=1):
            if sl is not None:
                piece = np.zeros(labels_2d.shape, bool)
                piece[sl] = pieces[sl] == i
                out.append((int(lab), piece, sl))
    return out


@dataclass
class RegionDecode:
    """One slice decoded with one prompt per region piece (:func:`decode_regions`).

    ``logits`` (3, H, W) float16: slot ``i`` unites, over the pieces, the mask each piece keeps when
    mask ``i + 1`` is asked for (:func:`choose_mask`; logits +1 inside the piece where the piece
    itself is kept, capped at -1 outside the piece). ``ious``: the decoder's predicted IoUs, the best
    piece's per slot. ``regions``: the prompts, most anomalous first. ``outcomes`` (3, P) int8 and
    ``agreement`` (3, P): per slot and piece, the mask kept (1-3, or :data:`REGION_OUTCOME`) and
    its agreement with the region."""

    logits: np.ndarray
    ious: np.ndarray
    regions: list[RegionPrompt]
    outcomes: np.ndarray
    agreement: np.ndarray

    @property
    def prompt(self) -> Prompt | None:
        return regions_prompt(self.regions)


def regions_prompt(regions: list[RegionPrompt]) -> Prompt | None:
    """The slice's prompt as recorded in results: one point or box, several, or none."""
    if not regions:
        return None
    if len(regions) == 1:
        return regions[0].prompt
    if regions[0].prompt.kind == "point":
        return Prompt("points", points=tuple(r.prompt.point for r in regions))  # type: ignore[misc]
    return Prompt("boxes", boxes=tuple(r.prompt.box for r in regions))  # type: ignore[misc]


def decode_regions(backbone, embedding, labels_2d: np.ndarray, map_2d: np.ndarray, *, gamma: float = GAMMA,
                   kind: str = "box", core: np.ndarray | None = None, moved: dict[int, Prompt] | None = None) -> RegionDecode:
    """Decode one slice with one prompt per region piece (:func:`region_prompts`) and unite the
    masks each piece keeps (:func:`choose_mask` against ``core``, the slice's
    :func:`~napari_mias_sam.method.regions.region_cores`, for each of the three mask choices).

    ``moved``: piece index -> a prompt the user placed instead (its masks are kept as the decoder
    gives them: no clipping to the piece and no agreement rule; outcome = the mask asked for)."""
    regions = region_prompts(labels_2d, map_2d, gamma=gamma, kind=kind)
    shape = labels_2d.shape
    n = len(regions)
    if not regions:
        return RegionDecode(np.zeros((3, *shape), np.float16), np.full(3, np.nan, np.float32), [],
                            np.zeros((3, 0), np.int8), np.zeros((3, 0), np.float32))
    logits = np.full((3, *shape), -np.inf, np.float32)
    ious = np.full(3, -np.inf, np.float32)
    outcomes = np.zeros((3, n), np.int8)
    agreement = np.zeros((3, n), np.float32)
    emb = embedding.float() if hasattr(embedding, "float") else embedding  # converted once for every piece
    for j, user in (moved or {}).items():
        if 0 <= j < n:
            regions[j] = replace(regions[j], centre=_centre(user), prompt=user)
    prompts = [r.prompt for r in regions]
    many = getattr(backbone, "decode_many", None)  # every piece's decode in one call (each equal to decode's)
    decoded = many(emb, prompts) if (many is not None and n > 1) else [backbone.decode(emb, p) for p in prompts]
    for j, (reg, out) in enumerate(zip(regions, decoded)):
        piece = reg.piece
        user = (moved or {}).get(j)
        lg = np.asarray(out.logits, np.float32)
        ious = np.maximum(ious, np.asarray(out.iou, np.float32))
        masks = lg > 0
        for slot in range(3):
            if user is not None:
                kept, outcome, ag = lg[slot], slot + 1, mask_agreement(masks[slot], piece, core)
            else:
                _, outcome, ag = choose_mask(masks, piece, slot + 1, core=core)
                kept = (np.where(piece, 1.0, -1.0) if outcome == REGION_OUTCOME
                        else np.where(piece, lg[outcome - 1], np.minimum(lg[outcome - 1], -1.0)))
            logits[slot] = np.maximum(logits[slot], kept)
            outcomes[slot, j], agreement[slot, j] = outcome, ag
    return RegionDecode(logits.astype(np.float16), ious, regions, outcomes, agreement)


def _centre(p: Prompt) -> tuple[float, float]:
    if p.kind == "point":
        return (float(p.point[0]), float(p.point[1]))  # type: ignore[index]
    x0, y0, x1, y1 = p.box  # type: ignore[misc]
    return ((x0 + x1) / 2, (y0 + y1) / 2)
