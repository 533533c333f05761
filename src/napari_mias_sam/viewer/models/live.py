"""Live quality assurance on one segmentation result (what the napari widget drives; no Qt).

A :class:`LiveSession` owns a :class:`~napari_mias_sam.pipeline.segment.SegmentationResult` and the
backbone that made it, and turns viewer actions into pipeline calls:

* a new gamma, prompt type or threshold re-prompts and re-decodes slices from the cached
  embeddings and maps (:func:`~napari_mias_sam.pipeline.segment.redecode_slice` returns each slice,
  which the session takes into its result; no encoder, no kNN);
* a new mask index only re-reads the cached decoder logits;
* a CoG point moved by the user becomes that slice's prompt (kept across later changes until
  :meth:`LiveSession.reset_points`);
* each prompted slice has a review status (:data:`~napari_mias_sam.data.qa_table.STATUSES`): moving
  its point makes it ``corrected``; :meth:`LiveSession.review` accepts, rejects (the slice's mask
  is cleared and stays cleared through later decodes and reruns) or resets it.

Every method that decodes takes the session lock, and a *generation* number lets a background
pass give up as soon as a newer change supersedes it, so slices are never decoded with stale
settings after the newest change. Decodes go through a
:class:`~napari_mias_sam.pipeline.decode_cache.CachedDecoder`: a slice whose prompt did not move
(or moved back) is not decoded again. Arrays handed to the viewer are in display order (see
:mod:`napari_mias_sam.viewer.models.layers`); the result itself stays in file order.

:func:`ranked_slices` is a pure function on arrays; the comparison with a ground truth
(:func:`compare_with_gt`, :func:`error_overlay`, the per-slice counts the viewer keeps) is in
:mod:`napari_mias_sam.viewer.models.compare`. Size: about 500 lines: one session's state and every
action on it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ...data.qa_table import ACCEPTED, CORRECTED, PENDING, REJECTED, STATUSES
from .compare import FN, FP, compare_with_gt, error_overlay  # noqa: F401 (the comparison helpers' public home was here)
from .layers import to_display
from ...pipeline.decode_cache import CachedDecoder, embedding_digest
from ...pipeline.segment import SegmentationResult, redecode_slice, region_labels, region_prompt_kind
from ...method.region_prompts import region_prompts, regions_prompt
from ...method.preprocess import from_frame
from ...method.prompts import make_prompt
from ...pipeline.settings import SegmentSettings
from ...core.records import to_dict

__all__ = [
    "CHANGE_NONE",
    "CHANGE_MASK",
    "CHANGE_PROMPT",
    "CHANGE_RERUN",
    "classify_change",
    "LiveSession",
    "SliceUpdate",
    "compare_with_gt",
    "error_overlay",
    "ranked_slices",
    "FP",
    "FN",
]

CHANGE_NONE = "none"
CHANGE_MASK = "mask"  # re-read cached logits
CHANGE_PROMPT = "prompt"  # re-prompt and re-decode (no encoder, no kNN)
CHANGE_RERUN = "rerun"  # needs new anomaly maps: run the pipeline again (embeddings are cached)


_PROMPT_FIELDS = ("gamma", "prompt", "threshold")
_MAP_FIELDS = ("k", "sigma", "normalisation", "slice_decision")


def classify_change(old: SegmentSettings, new: SegmentSettings) -> str:
    """What a settings change costs: none, mask (logits only), prompt (decode) or rerun (kNN)."""
    if any(getattr(old, f) != getattr(new, f) for f in _MAP_FIELDS) or old.extras != new.extras:
        return CHANGE_RERUN
    if any(getattr(old, f) != getattr(new, f) for f in _PROMPT_FIELDS):
        return CHANGE_PROMPT
    if old.mask_index != new.mask_index:
        return CHANGE_MASK
    return CHANGE_NONE


@dataclass
class SliceUpdate:
    """One slice brought up to date: its mask (display order), prompt centre (the first piece's),
    every prompt's centre (one per region piece with the regions prompt), IoUs, box prompt corners
    (display order) and their kind (the prompt type, or ``moved``)."""

    s: int
    mask: np.ndarray
    point: tuple[float, float, float] | None
    ious: np.ndarray
    boxes: list[np.ndarray] | None = None
    box_kind: str = ""
    points: list = field(default_factory=list)


class LiveSession:
    """One result, its backbone, user-moved prompt points and the display axis order."""

    def __init__(
        self,
        result: SegmentationResult,
        backbone,
        display_axes: tuple[int, ...] = (0, 1, 2),
        *,
        overrides: dict[int, tuple[float, float]] | None = None,
        statuses: dict[int, str] | None = None,
        decoder: CachedDecoder | None = None,
    ) -> None:
        self.result = result
        self.backbone = backbone
        # decodes remember their results (a decoder shared with earlier sessions keeps theirs)
        self.decoder = decoder if (decoder is not None and decoder.backbone is backbone) else CachedDecoder(backbone)
        self._digests: dict[int, bytes] = {}  # slice -> embedding digest (hashed once)
        self.axes = tuple(int(a) for a in display_axes)
        self.settings = result.settings
        self.overrides: dict[int, tuple[float, float]] = {}  # slice -> (x, y) in the model frame
        self.moved_piece: dict[int, int] = {}  # slice -> which region piece's prompt the moved point replaced
        self.lock = threading.RLock()
        self.generation = 0
        self.stale: set[int] = set()  # slices whose logits do not match the settings yet
        self._marks: dict[int, int] = {}  # per-slice count of 'made stale' events
        self.statuses: dict[int, str] = {}  # slice -> review status (absent: pending)
        self._method: dict[int, tuple] = {}  # slice -> the method's own (prompt, logits) under the settings in force
        self.removed: np.ndarray | None = None  # file-order voxels of rejected lesions: kept out of the shown mask
        if overrides:  # moved points carried over from an earlier run of the same volume
            self.overrides = {int(s): (float(x), float(y)) for s, (x, y) in overrides.items() if 0 <= int(s) < self.n_slices}
            self.mark_stale(self.overrides)
        for s, st in (statuses or {}).items():  # the review carried over (rejected slices are cleared)
            if 0 <= int(s) < self.n_slices and st != PENDING and self.result.prompts[int(s)] is not None:
                self.statuses[int(s)] = str(st)
        self.mark_stale([s for s, st in self.statuses.items() if st == REJECTED])

    # -- geometry -------------------------------------------------------------------------------
    @property
    def n_slices(self) -> int:
        return self.result.n_slices

    @property
    def display_axis(self) -> int:
        """The display (layer data) axis the pipeline sliced along."""
        return self.axes.index(self.result.axis)

    def slice_index(self, s: int) -> tuple:
        """Index of pipeline slice ``s`` in a display-order array."""
        idx: list[Any] = [slice(None)] * 3
        idx[self.display_axis] = int(s)
        return tuple(idx)

    def _slice_to_display(self, plane: np.ndarray) -> np.ndarray:
        rest = [a for a in range(3) if a != self.result.axis]
        pos = [self.axes.index(r) for r in rest]
        return plane if pos[0] < pos[1] else plane.T

    def file_to_display(self, ijk) -> tuple[float, float, float]:
        return tuple(float(ijk[f]) for f in self.axes)  # type: ignore[return-value]

    def display_to_file(self, coords) -> tuple[float, float, float]:
        out = [0.0, 0.0, 0.0]
        for a, f in enumerate(self.axes):
            out[f] = float(coords[a])
        return (out[0], out[1], out[2])

    def slice_of(self, display_coords) -> int:
        """Pipeline slice holding a display-order position (clipped to the volume)."""
        f = self.display_to_file(display_coords)
        return int(np.clip(round(f[self.result.axis]), 0, self.n_slices - 1))

    # -- arrays for the viewer (display order) ----------------------------------------------------
    def mask_volume(self) -> np.ndarray:
        """The shown mask in file voxel order: the result's, less the voxels of rejected lesions."""
        with self.lock:
            m = self.result.mask_volume(self.settings.mask_index)
            return m if self.removed is None else np.where(self.removed, 0, m).astype(m.dtype)

    def mask_display(self) -> np.ndarray:
        return np.ascontiguousarray(to_display(self.mask_volume(), self.axes))

    def anomaly_display(self) -> np.ndarray:
        return np.ascontiguousarray(to_display(self.result.anomaly_volume(), self.axes))

    def slice_mask_display(self, s: int) -> np.ndarray:
        """uint8 mask of slice ``s`` shaped like ``mask_display()[slice_index(s)]``."""
        m = self.result.slice_mask(s, self.settings.mask_index)
        m = m if self.removed is None else m & ~np.take(self.removed, int(s), axis=self.result.axis)
        return self._slice_to_display(m.astype(np.uint8))

    def point(self, s: int) -> tuple[float, float, float] | None:
        """Display-order position of slice ``s``'s prompt centre (None without a prompt); with one
        prompt per region piece, the most anomalous piece's."""
        ijk = self.result.cog_voxel(s)
        return None if ijk is None else self.file_to_display(ijk)

    def slice_points(self, s: int) -> list[tuple[float, float, float]]:
        """Display-order positions of every prompt of slice ``s`` (one per region piece with the
        regions prompt, each exactly the point sent or the centre of the box sent)."""
        return [self.file_to_display(ijk) for ijk in self.result.prompt_centres(s)]

    def points(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """All prompt centres (M, 3) in display order and their features (slice, region piece,
        score, IoU, mask kept, moved, review status): one row per prompt sent."""
        m = self.settings.mask_index - 1
        rows, feats = [], {"slice": [], "piece": [], "image_score": [], "predicted_iou": [], "mask_used": [], "moved": [],
                           "status": []}
        for s in range(self.n_slices):
            used, _ = self.result.mask_rule(s, self.settings.mask_index)
            for j, p in enumerate(self.slice_points(s)):
                rows.append(p)
                feats["slice"].append(s)
                feats["piece"].append(j)
                feats["image_score"].append(float(self.result.image_scores[s]))
                feats["predicted_iou"].append(float(self.result.ious[s, m]))
                feats["mask_used"].append(used[j] if j < len(used) else str(self.settings.mask_index))
                feats["moved"].append(s in self.overrides and self.moved_piece.get(s, 0) == j)
                feats["status"].append(self.status(s))
        coords = np.asarray(rows, dtype=float).reshape(-1, 3)
        return coords, {k: np.asarray(v) for k, v in feats.items()}

    def mask_rule_text(self, s: int) -> str:
        """Which mask each prompt of slice ``s`` kept and its agreement with the map's region
        (regions prompt), e.g. ``"mask 1 (agreement 0.74); region (no mask agreed)"``; '' otherwise."""
        used, agreement = self.result.mask_rule(s, self.settings.mask_index)
        return "; ".join("region (no mask agreed with the map)" if u == "region" else f"mask {u} (agreement {a:.2f})"
                         for u, a in zip(used, agreement))

    def box_corners(self, s: int) -> list[np.ndarray]:
        """The box prompt(s) of slice ``s`` as (4, 3) display-order corner arrays (none for a
        point prompt or no prompt)."""
        p = self.result.prompts[s]
        if p is None or p.kind == "point":
            return []
        boxes = [p.box] if p.kind == "box" else list(p.boxes or ())
        fr = self.result.encoded.frame
        rest = [a for a in range(3) if a != self.result.axis]
        out = []
        for x0, y0, x1, y1 in boxes:  # type: ignore[misc]
            corners = []
            for y, x in ((y0, x0), (y0, x1), (y1, x1), (y1, x0)):
                ijk = [0.0, 0.0, 0.0]
                ijk[self.result.axis] = float(s)
                ijk[rest[0]], ijk[rest[1]] = fr.to_slice(y, x)
                corners.append(self.file_to_display(ijk))
            out.append(np.asarray(corners, dtype=float))
        return out

    def prompt_shapes(self) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Every slice's box prompt(s) in display order and their features: slice, kind (the
        prompt type, or ``moved`` for a box re-centred on a user-moved point)."""
        shapes, feats = [], {"slice": [], "kind": []}
        for s in range(self.n_slices):
            kind = self.box_kind(s)
            for corners in self.box_corners(s):
                shapes.append(corners)
                feats["slice"].append(s)
                feats["kind"].append(kind)
        return shapes, {"slice": np.asarray(feats["slice"], dtype=int), "kind": np.asarray(feats["kind"], dtype=object)}

    def mask_counts(self, nonempty: np.ndarray | None = None) -> dict[str, int]:
        """How many slices hold anatomy, were prompted, were dropped by the slice decision, and
        kept a non-empty mask (with the mask choice in force). ``nonempty``: which slices' shown
        masks are non-empty, when the caller has them (else each slice's mask is computed)."""
        r = self.result
        prompted = [s for s in range(self.n_slices) if r.prompts[s] is not None]
        dropped = [s for s in prompted if not r.decision[s]]
        if nonempty is None:
            kept = [s for s in prompted if r.decision[s] and bool(r.slice_mask(s, self.settings.mask_index).any())]
        else:
            kept = [s for s in prompted if r.decision[s] and bool(nonempty[s])]
        return {"slices": self.n_slices, "anatomy": int(np.sum(r.encoded.foreground)), "prompted": len(prompted),
                "dropped": len(dropped), "kept": len(kept)}

    def ious(self, s: int) -> np.ndarray:
        """The three predicted IoUs of slice ``s`` (NaN without a prompt)."""
        return np.asarray(self.result.ious[s], dtype=float)

    # -- changes --------------------------------------------------------------------------------
    # Main-thread methods below never wait on ``lock`` (it is held while a slice decodes); they
    # only assign attributes and use in-place set/dict operations, which are atomic under the GIL.
    def new_generation(self) -> int:
        """Start a new generation: background passes of older generations stop at their next slice."""
        self.generation += 1
        return self.generation

    def mark_stale(self, slices) -> None:
        """These slices need decoding again (settings or their point changed)."""
        for s in slices:
            self._marks[int(s)] = self._marks.get(int(s), 0) + 1
            self.stale.add(int(s))

    def change_settings(self, settings: SegmentSettings) -> str:
        """Adopt new settings; returns the change kind. A prompt change marks every slice stale.
        An unset mask is the prompt's default (1 for regions, 3 otherwise)."""
        settings = settings.with_default_mask(self.settings.prompt)
        kind = classify_change(self.settings, settings)
        if kind in (CHANGE_RERUN, CHANGE_NONE):
            return kind
        self.settings = settings
        self._method = {}
        if kind == CHANGE_PROMPT:
            self.mark_stale(range(self.n_slices))
            self.new_generation()
        return kind

    def move_point(self, s: int, display_coords, piece: int = 0) -> tuple[float, float]:
        """Make a display-order position the prompt of slice ``s`` (of its region piece ``piece``
        with the regions prompt; stale until re-decoded); returns it as model-frame (x, y)."""
        f = self.display_to_file(display_coords)
        rest = [a for a in range(3) if a != self.result.axis]
        fr = self.result.encoded.frame
        y, x = fr.to_frame(f[rest[0]], f[rest[1]])
        hi = fr.size - 1.0
        xy = (float(np.clip(x, 0.0, hi)), float(np.clip(y, 0.0, hi)))
        self.overrides[int(s)] = xy
        self.moved_piece[int(s)] = int(piece)
        self.statuses[int(s)] = CORRECTED
        self.mark_stale([int(s)])
        return xy

    def reset_points(self) -> list[int]:
        """Forget user-moved points; returns the slices that became stale."""
        slices = sorted(self.overrides)
        self.overrides = {}
        self.moved_piece = {}
        for s in slices:  # a corrected slice is pending again
            if self.statuses.get(s) == CORRECTED:
                self.statuses.pop(s)
        self.mark_stale(slices)
        return slices

    # -- review -----------------------------------------------------------------------------------
    def status(self, s: int) -> str:
        """Slice ``s``'s review status ('' without a prompt)."""
        if self.result.prompts[s] is None:
            return ""
        return self.statuses.get(int(s), CORRECTED if int(s) in self.overrides else PENDING)

    def review(self, s: int, action: str) -> list[int]:
        """``accept``, ``reject`` or ``reset`` slice ``s``; returns the slices that became stale
        (a rejected slice's mask is cleared by its next decode; accepting or resetting it decodes it
        again). A slice without a prompt has nothing to review (nothing happens)."""
        s = int(s)
        if self.result.prompts[s] is None:
            return []
        was = self.status(s)
        if action == "accept":
            self.statuses[s] = CORRECTED if s in self.overrides else ACCEPTED
            stale = [s] if was == REJECTED else []
        elif action == "reject":
            self.statuses[s] = REJECTED
            stale = [s]
        elif action == "reset":
            self.statuses.pop(s, None)
            stale = [s] if (s in self.overrides or was == REJECTED) else []
            self.overrides.pop(s, None)
            self.moved_piece.pop(s, None)
        else:
            raise ValueError(f"unknown review action {action!r}: accept, reject or reset")
        self.mark_stale(stale)
        return stale

    def review_counts(self) -> dict[str, int]:
        """How many prompted slices are pending, accepted, corrected, rejected (and prompted)."""
        sts = [self.status(s) for s in range(self.n_slices)]
        out = {k: sts.count(k) for k in STATUSES}
        out["prompted"] = sum(out.values())
        return out

    def next_pending(self, s: int, step: int = 1) -> int | None:
        """The next (``step`` 1) or previous (-1) prompted slice still pending after ``s``, going
        round the volume; None when none is pending."""
        n = self.n_slices
        for d in range(1, n + 1):
            t = (int(s) + step * d) % n
            if self.status(t) == PENDING:
                return t
        return None

    def method_slice(self, s: int, with_mask: bool = True) -> tuple[tuple[float, float, float] | None, np.ndarray | None]:
        """The method's own prompt centre (file voxel indices) and slice mask (None unless
        ``with_mask``) for slice ``s`` under the settings in force, whatever the review did there (a
        moved point, a rejection): the "before" of the QA table. Decodes at most once per slice and
        settings (cached)."""
        s = int(s)
        with self.lock:
            r = self.result
            plain = s not in self.overrides
            if plain and (not with_mask or self.status(s) != REJECTED):
                return r.cog_voxel(s), (r.slice_mask(s, self.settings.mask_index) if with_mask else None)
            st = self.settings
            if not with_mask and s not in self._method:  # the centre needs no decoder
                if st.prompt == "regions":
                    p = regions_prompt(region_prompts(region_labels(r)[s], r.maps[s], gamma=st.gamma,
                                                      kind=region_prompt_kind(self.backbone)))
                else:
                    p = make_prompt(r.maps[s], st.prompt or "cog-point", gamma=st.gamma, threshold=st.threshold)
                return r.prompt_voxel(s, p), None
            if s not in self._method:  # decoded aside: the result keeps the review's prompt and mask
                with self.decoding(s):
                    d = redecode_slice(r, self.decoder, s, settings=st)
                self._method[s] = (r.prompt_voxel(s, d.prompt), d.logits)
            ijk, logits = self._method[s]
            if not with_mask:
                return ijk, None
            fr = r.encoded.frame
            mask = from_frame(logits[None, self.settings.mask_index - 1].astype(np.float32), fr)[0] > 0
            return ijk, mask & bool(r.decision[s])

    def redecode(self, s: int, generation: int | None = None) -> bool:
        """Re-prompt and re-decode slice ``s`` with the current settings and its moved point.

        Returns False (doing nothing) when ``generation`` is given and no longer current.
        """
        s = int(s)
        with self.lock:
            if generation is not None and generation != self.generation:
                return False
            mark = self._marks.get(s, 0)
            with self.decoding(s):
                self.result.apply(redecode_slice(self.result, self.decoder, s, settings=self.settings,
                                                 point=self.overrides.get(s), piece=self.moved_piece.get(s)))
            if self.status(s) == REJECTED:  # "no anomaly here": the prompt stays, the mask is cleared
                self.result.logits[s] = 0
            if self._marks.get(s, 0) == mark:  # not made stale again while decoding
                self.stale.discard(s)
        return True

    def decoding(self, s: int):
        """Decodes of slice ``s`` name its embedding to the cache (hashed on first use only)."""
        if s not in self._digests:
            self._digests[s] = embedding_digest(self.result.encoded.embeddings[s])
        return self.decoder.embedding_known(self._digests[s])

    def order_from(self, s: int) -> list[int]:
        """Every slice, nearest to ``s`` first (the current slice updates first)."""
        idx = np.arange(self.n_slices)
        return [int(i) for i in idx[np.argsort(np.abs(idx - int(s)), kind="stable")]]

    def box_kind(self, s: int) -> str:
        """What slice ``s``'s box prompts are shown as: ``moved`` (re-centred on a moved point) or
        the prompt type."""
        return "moved" if int(s) in self.overrides else str(self.settings.prompt)

    def slice_update(self, s: int) -> SliceUpdate:
        """Everything the viewer shows for slice ``s`` (computed under the lock)."""
        with self.lock:
            mask = self.slice_mask_display(s)
            return SliceUpdate(s=int(s), mask=mask, point=self.point(s), ious=self.ious(s).copy(),
                               boxes=self.box_corners(s), box_kind=self.box_kind(s), points=self.slice_points(s))

    def refresh_iter(self, order: list[int], generation: int, cancelled=None, after_first=None) -> Iterator[SliceUpdate]:
        """Bring slices in ``order`` up to date: decode the stale ones, yield every slice's update.
        Stops as soon as ``generation`` is superseded or ``cancelled()`` is true. ``after_first()``
        is called once the first slice's update was taken (the viewer: wait until the slice shown
        is drawn, so that its drawing does not share the CPU with the next slices' decodes)."""
        for i, s in enumerate(order):
            if (cancelled is not None and cancelled()) or generation != self.generation:
                return
            if s in self.stale and not self.redecode(s, generation):
                return
            yield self.slice_update(s)
            if i == 0 and after_first is not None:
                after_first()

    def sync(self) -> None:
        """Record the settings in force on the result (call when no slice is stale)."""
        with self.lock:
            self.result.settings = self.settings

    def metadata(self) -> dict:
        """The result's provenance plus the live state (settings in force, moved points)."""
        md = self.result.metadata()
        md["settings"] = to_dict(self.settings)
        md["moved_points"] = {str(s): [round(x, 3), round(y, 3)] for s, (x, y) in sorted(self.overrides.items())}
        md["review"] = {str(s): st for s, st in sorted(self.statuses.items())}
        md["stale_slices"] = sorted(self.stale)
        md["display_axes"] = list(self.axes)
        return md


def ranked_slices(image_scores: np.ndarray, foreground: np.ndarray | None = None) -> list[int]:
    """Slices from the most to the least anomalous (by image score); slices without anatomy last."""
    sc = np.asarray(image_scores, dtype=float).copy()
    if foreground is not None:
        sc[~np.asarray(foreground, bool)] = -np.inf
    return [int(i) for i in np.argsort(-sc, kind="stable")]
