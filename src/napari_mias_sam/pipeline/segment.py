"""segment_volume(): volume -> slices -> embeddings (cached) -> patch distances -> anomaly maps
-> prompts -> 3 masks per slice -> volumes on the input's voxel grid.

Progress is reported through a callback ``progress(stage, done, total)`` and cancellation through
``cancelled() -> bool``; nothing here knows about Qt. Per-slice re-decoding (:func:`redecode_slice`)
is what the viewer calls when gamma, the mask, the prompt type or a CoG point changes.

Size: one module on purpose (about 730 lines): the one path a volume takes, stage by stage, and the
result it returns, so that a reader follows a run without changing files.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any
import numpy as np
import torch

from ..core import defaults
from ..method.anomaly import calibration_entry, image_scores, maps_from_scores, mean_of_k_nearest, normalise_maps
from ..method.prompts import Prompt, make_prompt, point_prompts_work
from ..bank import MemoryBank, check_compatible
from ..bank.store import preprocessing_from_bank
from .embedding_cache import EmbeddingCache, frames_key, neighbours_key
from ..core.errors import Cancelled, InputError, MiasSamError
from ..core.progress import CancelFn, ProgressFn
from ..data.volumes import Volume
from ..method.patches import GRID, patch_features
from ..method.preprocess import Frame, from_frame, resolve_axis, Preprocessing
from ..method.reference_encoding import embedding_dtype, encoding_of
from ..method.regions import NormalLevels, anomalous_regions, bank_levels, no_regions_reason, region_cores, regions_supported
from ..method.region_prompts import REGION_OUTCOME, RegionDecode, decode_regions, region_prompts
from .settings import VOLUME_PROMPT, SegmentSettings, resolve_defaults
from ..core.records import to_dict
from .frames import volume_frames

__all__ = [
    "EncodedVolume",
    "SegmentationResult",
    "encode_volume",
    "encode_frames",
    "cached_encode",
    "neighbour_distances",
    "score_volume",
    "decode_all",
    "SliceDecode",
    "redecode_slice",
    "decoder_prompts",
    "RunSetup",
    "setup_run",
    "segment_volume",
    "maps_reusable",
]

#: Slices decoded together on a GPU (decode_all's default there; the CPU decodes slice by slice).
GPU_DECODE_BATCH = 16


def _check(cancelled: CancelFn | None) -> None:
    if cancelled is not None and cancelled():
        raise Cancelled("cancelled by the user")


@dataclass
class EncodedVolume:
    """A volume's slices in the model frame and their embeddings (on the CPU; float16, or float32
    with the ``reference`` encoding)."""

    embeddings: torch.Tensor  # (N, 256, 64, 64) float16 (float32: reference encoding)
    frames: torch.Tensor  # (N, 256, 256) float32 in [0, 1]
    foreground: np.ndarray  # (N,) bool: slice holds anatomy
    axis: int
    frame: Frame
    key: str
    from_cache: bool = False


def encode_frames(
    frames: torch.Tensor,
    backbone,
    *,
    batch_size: int = defaults.BATCH_SIZE,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
    stage: str = "encode slices",
) -> torch.Tensor:
    """Encode (N, 256, 256) frames in batches -> (N, 256, 64, 64) on the CPU, float16 (float32 for
    the ``reference`` encoding, which keeps embeddings as the paper's code does)."""
    dtype = embedding_dtype(backbone)
    out = []
    n = len(frames)
    for b0 in range(0, n, batch_size):
        _check(cancelled)
        emb = backbone.encode(frames[b0 : b0 + batch_size])
        out.append(emb.to(dtype).cpu())
        if progress:
            progress(stage, min(n, b0 + batch_size), n)
    return torch.cat(out) if out else torch.zeros((0, 256, 64, 64), dtype=dtype)


def cached_encode(
    frames: torch.Tensor,
    backbone,
    cache: EmbeddingCache | None,
    *,
    batch_size: int = defaults.BATCH_SIZE,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> tuple[torch.Tensor, str, bool]:
    """Embeddings of ``frames``: from ``cache`` when it holds them (keyed by content, backbone
    weights and precision), else encoded and stored there. Returns (embeddings, key, from cache)."""
    key = frames_key(frames, backbone.describe(), precision=getattr(backbone, "precision", "fp32"))
    emb = cache.get(key) if cache is not None else None
    hit = emb is not None and len(emb) == len(frames)
    if not hit:
        emb = encode_frames(frames, backbone, batch_size=batch_size, progress=progress, cancelled=cancelled)
        if cache is not None:
            cache.put(key, emb, dtype=embedding_dtype(backbone))
    return emb, key, hit


def _model_frames(volume: Volume, backbone, prep: Preprocessing, ax: int):
    """The volume's slices as the backbone sees them (its encoding) and which hold anatomy."""
    data = volume.data if volume.channels is None else volume.channels
    return volume_frames(data, prep, ax, source=str(volume.path or "volume"), encoding=encoding_of(backbone))


def encode_volume(
    volume: Volume,
    backbone,
    prep: Preprocessing,
    *,
    axis: int | str = defaults.SLICE_AXIS,
    cache: EmbeddingCache | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> EncodedVolume:
    """Preprocess, slice and encode a volume; reuse cached embeddings of identical slices."""
    ax = resolve_axis(axis, volume.affine)
    frames, fg = _model_frames(volume, backbone, prep, ax)
    h, w = [s for i, s in enumerate(volume.shape) if i != ax]
    emb, key, hit = cached_encode(frames, backbone, cache, batch_size=batch_size, progress=progress, cancelled=cancelled)
    if hit and progress:
        progress("encode slices (cached)", len(frames), len(frames))
    return EncodedVolume(embeddings=emb, frames=frames, foreground=fg, axis=ax, frame=Frame(h, w), key=key, from_cache=hit)


def score_volume(
    embeddings: torch.Tensor,
    bank: MemoryBank,
    *,
    k: int = defaults.K,
    sigma: float = defaults.SIGMA,
    batch_size: int = defaults.KNN_BATCH_SLICES,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
    cache: EmbeddingCache | None = None,
    embeddings_key: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Patch scores (N, 32, 32) and raw (unnormalised) anomaly maps (N, 256, 256).

    With ``cache`` and ``embeddings_key`` (the embeddings' :func:`frames_key`), the
    nearest-neighbour distances are read from the cache when this bank and k searched these
    embeddings before, else searched and stored there."""
    key = neighbours_key(embeddings_key, bank_fingerprint(bank), k) if (cache is not None and embeddings_key) else None
    d = cache.get_array(key) if key is not None else None
    if d is None or d.shape[:2] != (len(embeddings), GRID * GRID):
        d = neighbour_distances(embeddings, bank, k=k, batch_size=batch_size, progress=progress, cancelled=cancelled)
        if key is not None:
            cache.put_array(key, d)
    elif progress:
        progress("nearest-neighbour search (cached)", len(embeddings), len(embeddings))
    scores = mean_of_k_nearest(d, k, axis=2).reshape(len(d), GRID, GRID).astype(np.float32)
    return scores, maps_from_scores(scores, sigma=sigma)


def neighbour_distances(
    embeddings: torch.Tensor,
    bank: MemoryBank,
    *,
    k: int = defaults.K,
    batch_size: int = defaults.KNN_BATCH_SLICES,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> np.ndarray:
    """(N, 1024, k) sorted squared L2 distances of each slice's patches to their k nearest bank
    patches; a patch's score is the mean of its row (the first j columns serve any k = j)."""
    n = len(embeddings)
    out = np.zeros((n, GRID * GRID, min(k, bank.ntotal)), dtype=np.float32)
    dev = getattr(bank, "search_device", torch.device("cpu"))  # the GPU when the bank is searched there
    for b0 in range(0, n, batch_size):
        _check(cancelled)
        feats = patch_features(embeddings[b0 : b0 + batch_size].to(dev).float(), bank.layout)
        m = feats.shape[0]
        out[b0 : b0 + m] = bank.search(feats.reshape(-1, feats.shape[-1]), k).reshape(m, GRID * GRID, -1)
        if progress:
            progress("nearest-neighbour search", min(n, b0 + batch_size), n)
    return out


@dataclass
class SegmentationResult:
    """Everything a run produced, in the model frame and mapped back to the input's voxel grid."""

    volume: Volume
    encoded: EncodedVolume
    settings: SegmentSettings  # prompt resolved to a concrete type
    bank_info: dict
    backbone_info: dict
    preprocessing: dict
    scores: np.ndarray  # (N, 32, 32) patch scores
    raw_maps: np.ndarray  # (N, 256, 256) unnormalised
    maps: np.ndarray  # (N, 256, 256) normalised (what prompts read)
    image_scores: np.ndarray  # (N,)
    decision: np.ndarray  # (N,) bool: slice judged anomalous (all True without a slice decision)
    decision_threshold: float | None
    prompts: list[Prompt | None]
    logits: np.ndarray  # (N, 3, 256, 256) float16 mask logits (0 where no prompt)
    ious: np.ndarray  # (N, 3) predicted IoU (NaN where no prompt)
    timings: dict = field(default_factory=dict)
    maps_reused: bool = False  # patch scores and raw maps taken from an earlier result (no kNN search)
    regions: np.ndarray | None = None  # (N, 256, 256) int32 anomalous-region labels (0 = none)
    region_cores: np.ndarray | None = None  # (N, 256, 256) bool: region pixels above the seed level
    region_levels: NormalLevels | None = None  # the bank-calibrated levels that found them
    region_decodes: list[RegionDecode | None] | None = None  # per slice (regions prompt): prompts, masks kept

    def __post_init__(self) -> None:
        self.settings = self.settings.with_default_mask()

    @property
    def axis(self) -> int:
        return self.encoded.axis

    @property
    def n_slices(self) -> int:
        return len(self.prompts)

    def _to_volume(self, per_slice: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(per_slice, 0, self.axis))

    def slice_mask(self, s: int, mask_index: int | None = None) -> np.ndarray:
        """Boolean mask of slice ``s`` on the slice's own pixel grid (empty if not kept)."""
        m = (mask_index or self.settings.mask_index) - 1
        fr = self.encoded.frame
        if self.prompts[s] is None or not self.decision[s]:
            return np.zeros((fr.height, fr.width), dtype=bool)
        return from_frame(self.logits[s : s + 1, m].astype(np.float32), fr)[0] > 0

    def mask_volume(self, mask_index: int | None = None) -> np.ndarray:
        """uint8 mask on the input grid (1 = anomaly) using the chosen mask of each slice."""
        masks = np.stack([self.slice_mask(s, mask_index) for s in range(self.n_slices)])
        return self._to_volume(masks.astype(np.uint8))

    def anomaly_volume(self) -> np.ndarray:
        """float32 normalised anomaly map on the input grid."""
        return self._to_volume(from_frame(self.maps, self.encoded.frame).astype(np.float32))

    def cog_voxel(self, s: int) -> tuple[float, float, float] | None:
        """The prompt's centre (point, or box centre) of slice ``s`` as voxel indices (i, j, k).
        With one prompt per region piece, the first one's: the most anomalous piece's (a mean of
        the centres would sit between two lesions, on neither)."""
        return self.prompt_voxel(s, self.prompts[s])

    def prompt_voxel(self, s: int, prompt: Prompt | None) -> tuple[float, float, float] | None:
        """:meth:`cog_voxel` of ``prompt`` placed on slice ``s`` (e.g. a :class:`SliceDecode`'s)."""
        centres = self._centres(s, prompt)
        return centres[0] if centres else None

    def prompt_centres(self, s: int) -> list[tuple[float, float, float]]:
        """Voxel indices (i, j, k) of each prompt of slice ``s``: the point, or each box's centre
        (several for the regions prompt: one per region piece, most anomalous first; each is that
        piece's gamma-weighted centre of gravity, exactly where its prompt was sent)."""
        return self._centres(s, self.prompts[s])

    def _centres(self, s: int, p: Prompt | None) -> list[tuple[float, float, float]]:
        if p is None:
            return []
        return [self._frame_to_voxel(s, x, y) for x, y in p.centres()]

    def mask_rule(self, s: int, mask_index: int | None = None) -> tuple[list[str], list[float]]:
        """Per prompt of slice ``s`` (regions prompt): which mask it kept with ``mask_index`` (the
        settings' by default) -- ``"1"``-``"3"`` or ``"region"`` (no decoder mask agreed with the
        map) -- and its agreement with the region's core. Empty for other prompts."""
        d = self.region_decodes[s] if self.region_decodes is not None else None
        if d is None or self.prompts[s] is None or self.settings.prompt != "regions":
            return [], []
        slot = (mask_index or self.settings.mask_index) - 1
        used = ["region" if int(o) == REGION_OUTCOME else str(int(o)) for o in d.outcomes[slot]]
        return used, [float(a) for a in d.agreement[slot]]

    def _frame_to_voxel(self, s: int, x: float, y: float) -> tuple[float, float, float]:
        r, c = self.encoded.frame.to_slice(y, x)
        rest = [a for a in range(3) if a != self.axis]
        ijk = [0.0, 0.0, 0.0]
        ijk[self.axis] = float(s)
        ijk[rest[0]], ijk[rest[1]] = r, c
        return (ijk[0], ijk[1], ijk[2])

    def points_rows(self) -> list[dict]:
        """One row per slice: slice, CoG voxel indices i, j, k, image score, predicted IoU, ..., and
        ``levels``: how the regions prompt's levels were placed (:meth:`NormalLevels.describe`; empty otherwise)."""
        m = self.settings.mask_index - 1
        regions = self.settings.prompt == "regions" and self.region_levels is not None
        levels = self.region_levels.describe() if regions else ""
        rows = []
        for s in range(self.n_slices):
            ijk = self.cog_voxel(s)
            p = self.prompts[s]
            used, agreement = self.mask_rule(s)
            rows.append(
                {
                    "slice": s,
                    "i": "" if ijk is None else round(ijk[0], 2),
                    "j": "" if ijk is None else round(ijk[1], 2),
                    "k": "" if ijk is None else round(ijk[2], 2),
                    "image_score": round(float(self.image_scores[s]), 6),
                    "predicted_iou": "" if p is None else round(float(self.ious[s, m]), 4),
                    "anomalous": int(bool(self.decision[s])) if p is not None else 0,
                    "prompt": "none" if p is None else p.kind,
                    "prompts": len(self._centres(s, p)),
                    "mask_used": ";".join(used) if used else ("" if p is None else str(self.settings.mask_index)),
                    "agreement": ";".join(f"{a:.3f}" for a in agreement),
                    "levels": levels,
                }
            )
        return rows

    def apply(self, decoded: "SliceDecode") -> None:
        """Take a slice decoded again (:func:`redecode_slice`) into this result: its prompt, logits
        and IoUs replace the slice's, and its settings become the result's (what the live session,
        which owns its result, does after each change)."""
        s = decoded.s
        self.prompts[s], self.logits[s], self.ious[s] = decoded.prompt, decoded.logits, decoded.ious
        self.settings = decoded.settings
        if self.region_decodes is not None or decoded.detail is not None:
            if self.region_decodes is None:
                self.region_decodes = [None] * self.n_slices
            self.region_decodes[s] = decoded.detail

    def metadata(self) -> dict:
        """Every setting that made this result (stored in layer metadata and JSON output)."""
        return {
            "settings": to_dict(self.settings),
            "backbone": self.backbone_info,
            "bank": self.bank_info,
            "preprocessing": self.preprocessing,
            "slice_axis": self.axis,
            "decision_threshold": self.decision_threshold,
            "region_levels": self.region_levels.as_dict() if self.region_levels is not None else None,
            "source": str(self.volume.path) if self.volume.path else None,
        }


def _slice_prompt(amap: np.ndarray, settings: SegmentSettings) -> Prompt | None:
    return make_prompt(amap, settings.prompt or "cog-point", gamma=settings.gamma, threshold=settings.threshold)


def decode_one(backbone, embedding: torch.Tensor, prompt: Prompt | None, amap: np.ndarray | None = None, *, use_map_as_mask: bool = False):
    """Decode one slice; returns (logits (3, 256, 256) float16, iou (3,)) or zeros/NaN without a prompt."""
    if prompt is None:
        return np.zeros((3, 256, 256), np.float16), np.full(3, np.nan, np.float32)
    mask_input = None
    if use_map_as_mask and amap is not None:
        import torch.nn.functional as F

        mask_input = F.interpolate(torch.as_tensor(amap, dtype=torch.float32)[None, None], size=(256, 256), mode="bilinear")[0, 0]
    out = backbone.decode(embedding.float(), prompt, mask_input=mask_input)
    return out.logits.astype(np.float16), out.iou


def decode_all(
    encoded: EncodedVolume,
    maps: np.ndarray,
    backbone,
    settings: SegmentSettings,
    *,
    regions: np.ndarray | None = None,
    cores: np.ndarray | None = None,
    details: list | None = None,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> tuple[list[Prompt | None], np.ndarray, np.ndarray]:
    """Prompt and decode every slice with anatomy; empty slices get no prompt and no mask.

    With ``settings.prompt == "regions"``, ``regions`` (the labels of
    :func:`~napari_mias_sam.method.regions.anomalous_regions`) gives each slice one prompt per region
    piece, made from the gamma-weighted map inside it (a point where the backbone takes points, a
    box otherwise; :func:`~napari_mias_sam.method.region_prompts.decode_regions`, whose mask rule
    checks each mask against the piece's ``cores``); slices without a region get nothing.
    ``details``: a list that receives each slice's
    :class:`~napari_mias_sam.method.region_prompts.RegionDecode` (None for slices without one).

    ``batch_size`` slices are decoded together where the backbone offers ``decode_batch`` (one
    point or one box per slice, no map as mask input). ``None``: 1 (slice by slice, the exact
    historical results) on the CPU and :data:`GPU_DECODE_BATCH` on a GPU. Batched results equal
    slice-by-slice ones up to float rounding (mask logits within 1e-6, measured).
    """
    n = len(maps)
    prompts: list[Prompt | None] = [None] * n
    logits = np.zeros((n, 3, 256, 256), np.float16)
    ious = np.full((n, 3), np.nan, np.float32)
    use_map = bool(settings.extras.get("map_as_mask_input", False))
    if batch_size is None:
        batch_size = 1 if getattr(getattr(backbone, "device", None), "type", "cpu") == "cpu" else GPU_DECODE_BATCH
    batched = batch_size > 1 and not use_map and hasattr(backbone, "decode_batch")
    pending: list[int] = []

    def flush() -> None:
        outs = backbone.decode_batch(encoded.embeddings[pending], [prompts[i] for i in pending])
        for i, out in zip(pending, outs):
            logits[i], ious[i] = out.logits.astype(np.float16), out.iou
        pending.clear()

    if settings.prompt == "regions":
        if regions is None:
            raise ValueError("the regions prompt needs the volume's anomalous-region labels")
        kind = region_prompt_kind(backbone)
        for s in range(n):
            _check(cancelled)
            d = None
            if encoded.foreground[s] and regions[s].any():
                d = decode_regions(backbone, encoded.embeddings[s], regions[s], maps[s], gamma=settings.gamma, kind=kind,
                                   core=None if cores is None else cores[s])
                logits[s], ious[s], prompts[s] = d.logits, d.ious, d.prompt
            if details is not None:
                details.append(d)
            if progress:
                progress("prompt and decode", s + 1, n)
        return prompts, logits, ious
    for s in range(n):
        _check(cancelled)
        if encoded.foreground[s]:
            prompts[s] = _slice_prompt(maps[s], settings)
            if batched and backbone.batchable(prompts[s]):
                pending.append(s)
                if len(pending) >= batch_size:
                    flush()
            else:
                logits[s], ious[s] = decode_one(backbone, encoded.embeddings[s], prompts[s], maps[s], use_map_as_mask=use_map)
        if progress and not pending:
            progress("prompt and decode", s + 1, n)
    if pending:
        flush()
        if progress:
            progress("prompt and decode", n, n)
    return prompts, logits, ious


@dataclass(frozen=True)
class SliceDecode:
    """Slice ``s`` decoded again (:func:`redecode_slice`): its prompt, the decoder's three mask
    logits (3, 256, 256) float16 and predicted IoUs (3,), and the settings that made them.
    :meth:`SegmentationResult.apply` takes it into a result."""

    s: int
    prompt: Prompt | None
    logits: np.ndarray
    ious: np.ndarray
    settings: SegmentSettings
    detail: RegionDecode | None = None  # the regions prompt's pieces, prompts and masks kept


def redecode_slice(
    result: SegmentationResult,
    backbone,
    s: int,
    *,
    settings: SegmentSettings | None = None,
    point: tuple[float, float] | None = None,
    piece: int | None = None,
) -> SliceDecode:
    """Slice ``s`` of ``result`` prompted and decoded again after a settings change or a moved CoG
    point, from its cached embedding and map; ``result`` is left as it is.

    ``settings``: the new settings (default: the result's; an unset mask is the prompt's default).
    ``point`` is an (x, y) frame position chosen by the user (it replaces the computed prompt;
    with a box prompt type the box is re-centred on it with the same size). With the regions
    prompt it replaces the prompt of region piece ``piece`` (0: the most anomalous); the other
    pieces keep theirs. A slice without anatomy keeps what it has (no prompt).
    """
    st = result.settings if settings is None else settings.with_default_mask(result.settings.prompt)
    if not result.encoded.foreground[s]:
        return SliceDecode(s, result.prompts[s], result.logits[s].copy(), result.ious[s].copy(), st)
    emb = result.encoded.embeddings[s]
    if st.prompt == "regions":
        labels, kind = region_labels(result)[s], region_prompt_kind(backbone)
        moved = None
        if point is not None:
            regs = region_prompts(labels, result.maps[s], gamma=st.gamma, kind=kind)
            if not regs:  # a point placed on a slice without a region: the user's own prompt
                prompt = _point_without_region(result.maps[s], st, kind, point)
                return SliceDecode(s, prompt, *decode_one(backbone, emb, prompt), st)
            moved = dict([_moved_piece(regs, point, piece)])
        core = None if result.region_cores is None else result.region_cores[s]
        d = decode_regions(backbone, emb, labels, result.maps[s], gamma=st.gamma, kind=kind, core=core, moved=moved)
        return SliceDecode(s, d.prompt, d.logits, d.ious, st, d)
    prompt = _plain_prompt(result.maps[s], st, point)
    use_map = bool(st.extras.get("map_as_mask_input", False))
    logits, ious = decode_one(backbone, emb, prompt, result.maps[s], use_map_as_mask=use_map)
    return SliceDecode(s, prompt, logits, ious, st)


def decoder_prompts(result: SegmentationResult, backbone, s: int, *, settings: SegmentSettings | None = None,
                    point: tuple[float, float] | None = None, piece: int | None = None) -> list[Prompt]:
    """The prompts :func:`redecode_slice` sends to the decoder for the same arguments (one per
    region piece with the regions prompt), computed by the same functions, without decoding (the
    viewer's prefetch). Empty for a slice without anatomy or a prompt, or with the map as a mask
    input (decodes that are never remembered)."""
    st = result.settings if settings is None else settings.with_default_mask(result.settings.prompt)
    if not result.encoded.foreground[s]:
        return []
    if st.prompt == "regions":
        kind = region_prompt_kind(backbone)
        regs = region_prompts(region_labels(result)[s], result.maps[s], gamma=st.gamma, kind=kind)
        if point is not None and not regs:
            return [_point_without_region(result.maps[s], st, kind, point)]
        prompts = [r.prompt for r in regs]
        if point is not None:
            j, prompts[j] = _moved_piece(regs, point, piece)
        return prompts
    if st.extras.get("map_as_mask_input", False):
        return []
    prompt = _plain_prompt(result.maps[s], st, point)
    return [] if prompt is None else [prompt]


def _plain_prompt(amap: np.ndarray, st: SegmentSettings, point: tuple[float, float] | None) -> Prompt | None:
    """A per-slice prompt type's prompt, re-centred on the user's ``point`` when there is one."""
    prompt = _slice_prompt(amap, st)
    return prompt if point is None else _moved(prompt, point)


def _point_without_region(amap: np.ndarray, st: SegmentSettings, kind: str, point: tuple[float, float]) -> Prompt:
    """The regions prompt's user point on a slice without a region: its own CoG prompt, moved there."""
    return _moved(make_prompt(amap, "cog-" + kind, gamma=st.gamma), point)


def _moved_piece(regs: list, point: tuple[float, float], piece: int | None) -> tuple[int, Prompt]:
    """Which region piece a user's ``point`` replaces (``piece``, clamped; 0: the most anomalous)
    and that piece's prompt moved there."""
    j = min(max(int(piece or 0), 0), len(regs) - 1)
    return j, _moved(regs[j].prompt, point)


def region_prompt_kind(backbone) -> str:
    """How the regions prompt asks this backbone: ``"point"`` (the paper's CoG point) where its
    decoder was trained with points (SAM), ``"box"`` where it was not (LiteMedSAM)."""
    return "point" if point_prompts_work(getattr(backbone, "name", "sam")) else "box"


def _moved(prompt: Prompt | None, point: tuple[float, float]) -> Prompt:
    """``prompt`` moved to a user's ``point``: a box re-centred on it with the same size, else the point."""
    if prompt is not None and prompt.kind == "box":
        x0, y0, x1, y1 = prompt.box  # type: ignore[misc]
        hw, hh = (x1 - x0) / 2, (y1 - y0) / 2
        return Prompt("box", box=(point[0] - hw, point[1] - hh, point[0] + hw, point[1] + hh))
    return Prompt("point", point=(float(point[0]), float(point[1])))


@dataclass(frozen=True)
class RunSetup:
    """What every volume of one run shares, checked and resolved once (:func:`setup_run`): the
    bank and the backbone (checked compatible), the settings made concrete, the bank's
    preprocessing. :meth:`segment` runs one volume with it."""

    bank: MemoryBank
    backbone: Any
    settings: SegmentSettings  # prompt and mask concrete
    preprocessing: Preprocessing
    backbone_info: dict

    def segment(
        self,
        volume: Volume,
        *,
        axis: int | str | None = None,
        cache: EmbeddingCache | None = None,
        encoded: EncodedVolume | None = None,
        reuse: SegmentationResult | None = None,
        batch_size: int = defaults.BATCH_SIZE,
        progress: ProgressFn | None = None,
        cancelled: CancelFn | None = None,
    ) -> SegmentationResult:
        """Segment one volume (the arguments as :func:`segment_volume`'s)."""
        return _segment(self, volume, axis=axis, cache=cache, encoded=encoded, reuse=reuse, batch_size=batch_size,
                        progress=progress, cancelled=cancelled)


def setup_run(bank: MemoryBank, backbone, settings: SegmentSettings | None = None, *, slice_set: bool = False) -> RunSetup:
    """Check ``backbone`` against ``bank`` (:func:`~napari_mias_sam.bank.store.check_compatible`),
    make unset ``settings`` concrete (:func:`~.settings.resolve_defaults`; ``slice_set``: see
    :func:`segment_volume`), read the bank's preprocessing, and move the bank's search to the
    backbone's GPU when it has one. Done once per run, whatever the number of volumes."""
    settings = settings or SegmentSettings()
    regions_ok = regions_supported(bank, settings.k)
    if settings.prompt is None and not slice_set and not regions_ok and VOLUME_PROMPT == "regions":
        warnings.warn(f"{bank.path or 'the memory bank'}: {no_regions_reason(bank, settings.k)}.", stacklevel=2)
    settings = resolve_defaults(settings, backbone.name, volume=not slice_set, regions_ok=regions_ok)
    info = backbone.describe()
    check_compatible(bank, info)
    dev = getattr(backbone, "device", None)
    if dev is not None and torch.device(dev).type == "cuda":
        bank.use_gpu(dev)  # faiss-gpu, else the torch search on the backbone's GPU
    return RunSetup(bank=bank, backbone=backbone, settings=settings, preprocessing=preprocessing_from_bank(bank),
                    backbone_info=info)


def segment_volume(
    volume: Volume,
    bank: MemoryBank,
    backbone,
    settings: SegmentSettings | None = None,
    *,
    axis: int | str | None = None,
    cache: EmbeddingCache | None = None,
    encoded: EncodedVolume | None = None,
    reuse: SegmentationResult | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    slice_set: bool = False,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> SegmentationResult:
    """Run MIAS-SAM slice-wise on a whole volume (see the module docstring): :func:`setup_run`,
    then :meth:`RunSetup.segment`. A run of several volumes sets up once and segments each.

    ``slice_set=True``: the slices are a set of 2D images (BMAD PNGs), not one 3D volume: unset
    settings resolve to the paper's per-slice prompt instead of 3D regions (as they do with a bank
    without a usable calibration, :func:`~napari_mias_sam.method.regions.regions_supported`).

    ``reuse``: an earlier result. When it was made from the same slices (same content, axis and
    backbone) its embeddings are used, and when the bank, k and sigma are also the same its patch
    scores and raw maps too: only the normalisation, the prompts and the decoder run again
    (``maps_reused`` is then True).
    """
    return setup_run(bank, backbone, settings, slice_set=slice_set).segment(
        volume, axis=axis, cache=cache, encoded=encoded, reuse=reuse, batch_size=batch_size, progress=progress,
        cancelled=cancelled)


def _segment(setup: RunSetup, volume: Volume, *, axis, cache, encoded, reuse, batch_size, progress, cancelled) -> SegmentationResult:
    bank, backbone, settings, prep, info = setup.bank, setup.backbone, setup.settings, setup.preprocessing, setup.backbone_info
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    if encoded is None and reuse is not None:
        encoded = _reusable_encoding(reuse, volume, backbone, prep, axis if axis is not None else bank.slice_axis)
    if encoded is None:
        encoded = encode_volume(
            volume, backbone, prep, axis=axis if axis is not None else bank.slice_axis, cache=cache,
            batch_size=batch_size, progress=progress, cancelled=cancelled,
        )
    t["encode_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    reused = reuse is not None and maps_reusable(reuse, encoded, bank, settings)
    if reused:
        scores, raw = reuse.scores, reuse.raw_maps
    else:
        scores, raw = score_volume(encoded.embeddings, bank, k=settings.k, sigma=settings.sigma, progress=progress,
                                   cancelled=cancelled, cache=cache, embeddings_key=encoded.key)
    t["knn_and_map_s"] = time.perf_counter() - t1
    fg = encoded.foreground
    calibration = bank.calibration(settings.k) if settings.normalisation == "calibrated" else None
    maps = normalise_maps(raw, settings.normalisation, calibration, valid=fg)
    maps[~fg] = 0.0
    regions, cores, levels = find_regions(bank, raw, fg, settings, calibrated=maps if settings.normalisation == "calibrated" else None)
    img = image_scores(scores)
    decision = fg.copy()
    if settings.prompt == "regions":
        decision &= regions.reshape(len(regions), -1).any(1)
    threshold = None
    if settings.slice_decision:
        threshold = slice_decision_threshold(bank, settings.k)
        decision &= img > threshold
    t2 = time.perf_counter()
    details: list = []
    prompts, logits, ious = decode_all(encoded, maps, backbone, settings, regions=regions, cores=cores, details=details,
                                       progress=progress,
                                       cancelled=cancelled)
    t["prompt_and_decode_s"] = time.perf_counter() - t2
    return SegmentationResult(
        volume=volume, encoded=encoded, settings=settings, bank_info=_bank_info(bank), backbone_info=info,
        preprocessing=to_dict(prep), scores=scores, raw_maps=raw, maps=maps, image_scores=img,
        decision=decision, decision_threshold=threshold, prompts=prompts, logits=logits, ious=ious, timings=t,
        maps_reused=reused, regions=regions, region_cores=cores, region_levels=levels,
        region_decodes=details or None,
    )


def _reusable_encoding(reuse: SegmentationResult, volume: Volume, backbone, prep: Preprocessing, axis) -> EncodedVolume | None:
    """``reuse.encoded`` when ``volume`` gives the same slices for ``backbone`` (else None)."""
    ax = resolve_axis(axis, volume.affine)
    if reuse.encoded.axis != ax or reuse.volume.shape != volume.shape:
        return None
    frames, _fg = _model_frames(volume, backbone, prep, ax)
    key = frames_key(frames, backbone.describe(), precision=getattr(backbone, "precision", "fp32"))
    return replace(reuse.encoded, from_cache=True) if key == reuse.encoded.key else None


def maps_reusable(previous: SegmentationResult, encoded: EncodedVolume, bank: MemoryBank, settings: SegmentSettings) -> bool:
    """Can a run with ``settings`` reuse ``previous``'s patch scores and raw maps? Same slices
    (embedding key), same bank (provenance), same k and sigma: the kNN search would give the same."""
    return (
        previous.encoded.key == encoded.key
        and _same_bank(previous.bank_info, _bank_info(bank))
        and previous.settings.k == settings.k
        and previous.settings.sigma == settings.sigma
    )


def _same_bank(a: dict, b: dict) -> bool:
    """Same bank content, wherever it is saved (saving an unsaved bank only gives it a path)."""
    return {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}


def find_regions(bank: MemoryBank, raw: np.ndarray, foreground: np.ndarray, settings: SegmentSettings, *,
                 calibrated: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None, NormalLevels | None]:
    """The volume's anomalous 3D regions on its calibrated maps, their cores (pixels above the seed
    level) and the bank's normal levels.

    ``(None, None, None)`` when the bank has no calibration (then the regions prompt is refused)."""
    try:
        levels = bank_levels(bank, settings.k)
        cal = calibrated if calibrated is not None else bank.calibration(settings.k).apply(raw)
    except (ValueError, MiasSamError):
        if settings.prompt == "regions":
            raise InputError(f"{bank.path or 'bank'}: holds no normal calibration, which the regions prompt needs; "
                             "rebuild the bank, or choose --prompt cog-box / cog-point.") from None
        return None, None, None
    labels = anomalous_regions(cal, levels, foreground=foreground)
    return labels, region_cores(cal, labels, levels), levels


def region_labels(result: SegmentationResult) -> np.ndarray:
    """The result's region labels (the regions prompt cannot run without them)."""
    if result.regions is None:
        raise InputError("this result has no anomalous regions (its bank holds no normal calibration); "
                         "choose another prompt type.")
    return result.regions


def slice_decision_threshold(bank: MemoryBank, k: int = defaults.K, quantile: float = 100.0) -> float:
    """Image-score threshold from held-out NORMAL slices only (default: their maximum)."""
    scores = (calibration_entry(bank.manifest.get("calibration"), k) or {}).get("slice_scores", [])
    if not scores:
        raise ValueError("the bank holds no calibration slice scores; the slice decision needs them")
    return float(np.percentile(scores, quantile))


def bank_fingerprint(bank: MemoryBank) -> str:
    """SHA-256 of what identifies a bank's content wherever it is kept (saved or not, moved or
    copied): its manifest (sources, counts, creation time to the second, calibration statistics)
    and its size."""
    import hashlib
    import json

    manifest = {k: v for k, v in bank.manifest.items() if k != "index"}
    manifest["index"] = {k: v for k, v in bank.manifest.get("index", {}).items() if k not in ("file", "ntotal")}
    h = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode())
    h.update(f"|{bank.ntotal}x{bank.dim}".encode())
    return h.hexdigest()


def _bank_info(bank: MemoryBank) -> dict:
    return {
        "path": str(bank.path) if bank.path else None,
        "patch_layout": bank.layout,
        "patches": bank.ntotal,
        "index": bank.manifest.get("index", {}).get("type"),
        "created": bank.manifest.get("created"),
    }
