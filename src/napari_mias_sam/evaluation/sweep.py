"""Evaluation over many subjects or slices: the paper's metrics, 3D metrics, lesion-wise metrics
(BraTS 2023 rule, for the default and each bank) and ablations.

Each test slice is encoded once (embedding cache); the kNN runs once per (bank, k); a decode
pass runs once per (bank, k, normalisation, prompt, gamma); the three masks of one pass give
the mask ablation for free. Ablations vary one factor at a time around the default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core import defaults
from ..core.progress import ProgressFn
from ..method.anomaly import image_scores, maps_from_scores, mean_of_k_nearest, NORMALISATIONS
from ..bank import MemoryBank, check_compatible
from ..pipeline.embedding_cache import EmbeddingCache
from ..data.datasets import LesionLabels, check_lesion_labels, label_values, lesion_mask
from ..core.errors import InputError
from ..data.volumes import Volume, load_labels, load_volume
from .scoring import baseline_slices
from .lesionwise import LESIONWISE_SUMMARY_KEYS, lesionwise, summarise_cases
from ..method.lesions import LesionRule, label_lesions
from .metrics import aupro, image_auroc, paired_bootstrap, paper_slice_dice, pixel_auroc, volume_dice
from ..method.patches import GRID
from ..pipeline.segment import EncodedVolume, cached_encode, decode_all, neighbour_distances, slice_decision_threshold
from ..bank.store import preprocessing_from_bank
from ..method.preprocess import Frame, foreground_slices, from_frame, resolve_axis, to_frame, volume_slices
from ..method.prompts import PROMPT_TYPES, default_mask_for
from ..method.reference_encoding import encoding_of
from ..method.regions import anomalous_regions, bank_levels, region_cores, regions_supported
from ..pipeline.settings import SegmentSettings, resolve_defaults
from ..pipeline.frames import volume_frames

__all__ = ["TestUnit", "unit_from_volume", "units_from_volumes", "units_from_slices", "Ablations", "EvalContext",
           "encode_units", "unit_scores", "unit_maps", "baseline_scores", "evaluate"]



@dataclass
class TestUnit:
    """Test slices of one subject (a volume) or one group of same-size 2D slices."""

    name: str
    frames: torch.Tensor  # (N, 256, 256)
    foreground: np.ndarray  # (N,) bool
    frame: Frame
    gt: np.ndarray  # (N, H, W) bool, slices first
    labels: np.ndarray  # (N,) 1 = anomalous slice
    is_volume: bool
    embeddings: torch.Tensor | None = None
    spacing: tuple[float, float, float] | None = None  # mm per voxel, slices first (volumes: for lesion-wise HD95)


def unit_from_volume(vol: Volume, gt: np.ndarray, bank: MemoryBank, axis: int | str | None = None, *, name: str | None = None) -> TestUnit:
    """One unit from an image volume and its binary ground truth (file order), preprocessed as the bank was."""
    ax = resolve_axis(axis if axis is not None else bank.slice_axis, vol.affine)
    frames, fg = volume_frames(vol.data if vol.channels is None else vol.channels, preprocessing_from_bank(bank), ax,
                               source=str(vol.path or vol.name),
                             encoding=encoding_of(bank.backbone))
    g = volume_slices(np.asarray(gt, dtype=bool), ax)
    h, w = g.shape[1:]
    sp = vol.spacing
    spacing = (sp[ax], *[sp[a] for a in range(3) if a != ax])
    return TestUnit(name or vol.name, frames, fg, Frame(h, w), np.ascontiguousarray(g), g.reshape(len(g), -1).any(1).astype(int), True,
                    spacing=spacing)


def units_from_volumes(images: list[Path], gts: list[Path], bank: MemoryBank, axis: int | str | None = None, *,
                       lesion: LesionLabels = None) -> list[TestUnit]:
    """One unit per (image, ground truth) NIfTI pair; ``lesion``: the label values that count
    as the anomaly (None: any non-zero)."""
    if len(images) != len(gts):
        raise InputError(f"--images and --gts must pair up: got {len(images)} images and {len(gts)} ground truths.")
    if lesion is not None:  # labels the user chose: held by the ground truths, or refused before the images load
        check_lesion_labels(lesion, {Path(g).name: label_values(g) for g in gts},
                            source=f"--lesion-labels {','.join(map(str, lesion))}")
    units = []
    for img_p, gt_p in zip(images, gts):
        vol = load_volume(img_p)
        gt = load_labels(gt_p, like=vol)
        units.append(unit_from_volume(vol, lesion_mask(gt.data, lesion), bank, axis))
    return units


def units_from_slices(images: list[np.ndarray], masks: list[np.ndarray], labels: np.ndarray, name: str = "slices", *,
                      encoding: str = "standard") -> list[TestUnit]:
    """Units from 2D slices (BMAD), grouped by slice size, framed for ``encoding`` (the bank's)."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    units = []
    for (h, w), idx in by_shape.items():
        stack = np.stack([images[i] for i in idx]).astype(np.float32)
        gt = np.stack([masks[i] for i in idx]).astype(bool)
        units.append(TestUnit(f"{name}[{h}x{w}]", to_frame(stack, encoding=encoding), foreground_slices(stack), Frame(h, w), gt, np.asarray(labels)[idx], False))
    return units


@dataclass
class Ablations:
    """Which one-factor-at-a-time ablations to run (the default row is always run)."""

    prompts: tuple[str, ...] = PROMPT_TYPES
    gammas: tuple[float, ...] = defaults.GAMMA_SWEEP
    ks: tuple[int, ...] = defaults.K_SWEEP
    normalisations: tuple[str, ...] = NORMALISATIONS
    masks: tuple[int, ...] = (1, 2, 3)


@dataclass
class _Pass:
    logits: list[np.ndarray]
    ious: list[np.ndarray]
    prompts: list[list]


@dataclass
class EvalContext:
    units: list[TestUnit]
    banks: list[MemoryBank]
    backbone: object
    base: SegmentSettings
    progress: ProgressFn | None = None
    k_max: int = 1  # the largest k of the sweep: one search per bank
    scores: dict = field(default_factory=dict)  # (bank, k) -> list of (N, 32, 32); (bank, "dist") -> distances
    maps: dict = field(default_factory=dict)  # (bank, k, norm) -> list of (N, 256, 256)
    passes: dict = field(default_factory=dict)  # (bank, k, norm, prompt, gamma) -> _Pass
    #: ``(bank, units, k)`` -> per unit (N, 1024, k) distances, searched elsewhere (Dask workers);
    #: None: here, with :func:`neighbour_distances`
    search_units: Callable | None = None


def encode_units(units: list[TestUnit], backbone, cache: EmbeddingCache | None, progress: ProgressFn | None, batch_size: int) -> None:
    total = sum(len(u.frames) for u in units)
    done = 0
    for u in units:
        u.embeddings = cached_encode(u.frames, backbone, cache, batch_size=batch_size)[0]
        done += len(u.frames)
        if progress:
            progress("encode test slices", done, total)


def _neighbour_distances(ctx: EvalContext, b: int) -> list[np.ndarray]:
    """Per unit, (N, 1024, k_max) sorted squared distances to the bank: one search per bank
    serves every k of the sweep (the k nearest are the first k of the k_max nearest)."""
    if (b, "dist") not in ctx.scores:
        bank = ctx.banks[b]
        out = []
        if ctx.search_units is not None:
            out = ctx.search_units(bank, ctx.units, ctx.k_max)
        for u in ctx.units[len(out):]:
            out.append(neighbour_distances(u.embeddings, bank, k=ctx.k_max))
            if ctx.progress:
                ctx.progress(f"nearest-neighbour search ({_bank_name(bank)})", len(out), len(ctx.units))
        ctx.scores[(b, "dist")] = out
    return ctx.scores[(b, "dist")]


def unit_scores(ctx: EvalContext, b: int, k: int) -> list[np.ndarray]:
    """Per unit, (N, 32, 32) patch scores: mean squared distance to the k nearest bank patches."""
    if (b, k) not in ctx.scores:
        ctx.scores[(b, k)] = [mean_of_k_nearest(d, k, axis=2).reshape(len(d), GRID, GRID).astype(np.float32)
                              for d in _neighbour_distances(ctx, b)]
    return ctx.scores[(b, k)]


def unit_maps(ctx: EvalContext, b: int, k: int, norm: str) -> list[np.ndarray]:
    """Normalised frame maps per unit; 'reference' min-max spans the whole test set (paper)."""
    if (b, k, norm) in ctx.maps:
        return ctx.maps[(b, k, norm)]
    raw = [maps_from_scores(s, sigma=ctx.base.sigma) for s in unit_scores(ctx, b, k)]
    if norm == "calibrated":
        cal = ctx.banks[b].calibration(k)
        out = [cal.apply(m) for m in raw]
    else:
        pool = [m[u.foreground] for m, u in zip(raw, ctx.units) if u.foreground.any()]
        lo = min(float(p.min()) for p in pool)
        hi = max(float(p.max()) for p in pool)
        out = [np.clip((m - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32) for m in raw]
    for m, u in zip(out, ctx.units):
        m[~u.foreground] = 0.0
    ctx.maps[(b, k, norm)] = out
    return out


def _regions(ctx: EvalContext, b: int, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per unit, the anomalous-region labels of its calibrated maps with the bank's normal levels
    (3D for a volume, slice by slice for a group of 2D slices) and their cores. Whatever the
    normalisation of a pass, regions are found on the calibrated maps: their levels are calibrated ones."""
    if (b, k, "regions") not in ctx.maps:
        levels = bank_levels(ctx.banks[b], k)
        out = []
        for m, u in zip(unit_maps(ctx, b, k, "calibrated"), ctx.units):
            lab = anomalous_regions(m, levels, foreground=u.foreground, three_d=u.is_volume)
            out.append((lab, region_cores(m, lab, levels)))
        ctx.maps[(b, k, "regions")] = out
    return ctx.maps[(b, k, "regions")]


def _decode_pass(ctx: EvalContext, b: int, k: int, norm: str, prompt: str, gamma: float) -> _Pass:
    key = (b, k, norm, prompt, gamma)
    if key in ctx.passes:
        return ctx.passes[key]
    maps = unit_maps(ctx, b, k, norm)
    st = ctx.base.replace(prompt=prompt, gamma=gamma, k=k, normalisation=norm)
    regions = _regions(ctx, b, k) if prompt == "regions" else [(None, None)] * len(ctx.units)
    logits, ious, prompts = [], [], []
    for u, m, (r, c) in zip(ctx.units, maps, regions):
        enc = EncodedVolume(u.embeddings, u.frames, u.foreground, 0, u.frame, "")
        p, lg, io = decode_all(enc, m, ctx.backbone, st, regions=r, cores=c)
        logits.append(lg)
        ious.append(io)
        prompts.append(p)
    ctx.passes[key] = _Pass(logits, ious, prompts)
    if ctx.progress:
        ctx.progress("decode passes", len(ctx.passes), len(ctx.passes))
    return ctx.passes[key]


def _masks(u: TestUnit, logits: np.ndarray, mask_index: int, keep: np.ndarray) -> np.ndarray:
    m = from_frame(logits[:, mask_index - 1].astype(np.float32), u.frame) > 0
    m[~keep] = False
    return m


def _lesion_scores(u: TestUnit, m: np.ndarray) -> dict:
    """The BraTS lesion-wise scores of one volume's mask: its lesions (the default rule) against the
    ground truth's lesions."""
    lab = label_lesions(m, LesionRule())
    lw = lesionwise(lab > 0, u.gt, u.spacing or (1.0, 1.0, 1.0), pred_labels=lab)
    return {"subject": u.name, **{k: lw[k] for k in LESIONWISE_SUMMARY_KEYS}}


def _segmentation_metrics(ctx: EvalContext, pas: _Pass, mask_index: int, b: int, k: int, per_slice: list | None = None,
                          lesions: bool = False) -> dict:
    """Slice and volume Dice of one decode pass, with and without the slice decision.
    ``per_slice``: if given, receives (unit index, slice Dice) of every anomalous slice.
    ``lesions``: also the lesion-wise scores of each volume (BraTS 2023 rule)."""
    thr = slice_decision_threshold(ctx.banks[b], k)
    preds, preds_dec, gts, labels, vd, vd_dec, owner = [], [], [], [], [], [], []
    lesion_rows = []
    for u, lg, pr, sc in zip(ctx.units, pas.logits, pas.prompts, unit_scores(ctx, b, k)):
        has_prompt = np.array([p is not None for p in pr])
        keep = u.foreground & has_prompt
        m = _masks(u, lg, mask_index, keep)
        m_dec = m & (image_scores(sc) > thr)[:, None, None]
        preds.extend(m)
        preds_dec.extend(m_dec)
        gts.extend(u.gt)
        labels.extend(u.labels)
        owner.extend([len(vd_dec) if u.is_volume else -1] * len(m))
        if u.is_volume:
            vd.append(volume_dice(m, u.gt))
            vd_dec.append(volume_dice(m_dec, u.gt))
            if lesions:
                lesion_rows.append(_lesion_scores(u, m))
    lab = np.asarray(labels)
    sd = paper_slice_dice(preds, gts, labels=lab)
    if per_slice is not None:
        per_slice.extend((owner[i], v) for i, v in sd["per_slice"].items())
    return {
        "slice_dice": sd["mean"],
        "slice_dice_with_decision": paper_slice_dice(preds_dec, gts, labels=lab)["mean"],
        "volume_dice": float(np.mean(vd)) if vd else None,
        "volume_dice_with_decision": float(np.mean(vd_dec)) if vd_dec else None,
        "volume_dice_per_subject": [round(v, 4) for v in vd],
        "decision_threshold": thr,
        "slices_kept_with_decision": int(sum(bool(m.any()) for m in preds_dec)),
        **({"lesionwise": summarise_cases(lesion_rows), "lesionwise_per_subject": lesion_rows} if lesion_rows else {}),
    }


def _detection_metrics(ctx: EvalContext, b: int, k: int) -> dict:
    maps = unit_maps(ctx, b, k, "reference")
    grid_maps, gts, img_s, labels = [], [], [], []
    for u, m, sc in zip(ctx.units, maps, unit_scores(ctx, b, k)):
        grid_maps.extend(from_frame(m, u.frame))
        gts.extend(u.gt)
        img_s.extend(image_scores(sc))
        labels.extend(u.labels)
    lab = np.asarray(labels)
    out = {"p_auroc": None, "aupro_0.3": None, "image_auroc": None}
    if any(g.any() for g in gts) and not all(g.all() for g in gts):
        out["p_auroc"] = pixel_auroc(grid_maps, gts)
        out["aupro_0.3"] = aupro(grid_maps, gts, max_fpr=0.3)
    if 0 < lab.sum() < len(lab):
        out["image_auroc"] = image_auroc(np.asarray(img_s), lab)
    return out


def baseline_scores(ctx: EvalContext, b: int, k: int, threshold: float = defaults.BASELINE_THRESHOLD,
                    per_slice: list | None = None) -> dict:
    """Slice and volume Dice of the thresholding baseline (:func:`.scoring.baseline_slices` on the
    reference-normalised maps, no SAM). ``per_slice``: as in :func:`_segmentation_metrics`."""
    maps = unit_maps(ctx, b, k, "reference")
    preds, gts, labels, vd, owner = [], [], [], [], []
    for u, m in zip(ctx.units, maps):
        p = baseline_slices(m, u.foreground, u.frame, threshold)
        preds.extend(p)
        gts.extend(u.gt)
        labels.extend(u.labels)
        owner.extend([len(vd) if u.is_volume else -1] * len(p))
        if u.is_volume:
            vd.append(volume_dice(p, u.gt))
    sd = paper_slice_dice(preds, gts, labels=np.asarray(labels))
    if per_slice is not None:
        per_slice.extend((owner[i], v) for i, v in sd["per_slice"].items())
    return {
        "slice_dice": sd["mean"],
        "volume_dice": float(np.mean(vd)) if vd else None,
        "volume_dice_per_subject": [round(v, 4) for v in vd],
    }


def evaluate(
    units: list[TestUnit],
    banks: list[MemoryBank],
    backbone,
    *,
    base: SegmentSettings | None = None,
    ablations: Ablations | None = None,
    cache: EmbeddingCache | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    progress: ProgressFn | None = None,
    encode: Callable | None = None,
    search_units: Callable | None = None,
) -> dict:
    """Run the default setting and the ablations; return rows and detection metrics.

    ``encode(units, backbone, cache, progress, batch_size)`` replaces :func:`encode_units` and
    ``search_units(bank, units, k)`` the nearest-neighbour search (both: Dask workers,
    ``napari_mias_sam.scale.runs.evaluate_hooks``); the results are the same."""
    if not units:
        raise InputError("nothing to evaluate: no test slices")
    if not banks:
        raise InputError("evaluate needs at least one --bank")
    info = backbone.describe()
    for bk in banks:
        check_compatible(bk, info)
    # volumes: the regions prompt (mask 1); 2D slice sets: the paper's per-slice prompt (mask 3)
    chosen_mask = base.mask_index if base is not None else None
    base = base or SegmentSettings()
    base = resolve_defaults(base, backbone.name, volume=all(u.is_volume for u in units), regions_ok=regions_supported(banks[0], base.k))
    abl = ablations or Ablations()
    t0 = time.perf_counter()
    (encode or encode_units)(units, backbone, cache, progress, batch_size)
    t_enc = time.perf_counter() - t0
    ctx = EvalContext(units, banks, backbone, base, progress, k_max=max((base.k, *abl.ks)), search_units=search_units)
    rows: list[dict] = []

    def add(group: str, value, b: int, k: int, norm: str, prompt: str, gamma: float, mask: int, per_slice: list | None = None) -> None:
        pas = _decode_pass(ctx, b, k, norm, prompt, gamma)
        row = {"ablation": group, "value": str(value), "bank": _bank_name(banks[b]), "layout": banks[b].layout,
               "k": k, "normalisation": norm, "prompt": prompt, "gamma": gamma, "mask": mask}
        row.update(_segmentation_metrics(ctx, pas, mask, b, k, per_slice=per_slice, lesions=group in ("default", "bank")))
        rows.append(row)

    d = base
    mine, theirs = [], []  # (subject, slice Dice) of the default and of the baseline, for the paired comparison
    n_rows = len(rows)
    add("default", "default", 0, d.k, d.normalisation, d.prompt, d.gamma, d.mask_index, per_slice=mine)
    for m in abl.masks:
        add("mask", m, 0, d.k, d.normalisation, d.prompt, d.gamma, m)
    for p in abl.prompts:  # each prompt with its own default mask unless the run chose one
        add("prompt", p, 0, d.k, d.normalisation, p, d.gamma, chosen_mask or default_mask_for(p))
    for g in abl.gammas:
        add("gamma", g, 0, d.k, d.normalisation, d.prompt, g, d.mask_index)
    for n in abl.normalisations:
        add("normalisation", n, 0, d.k, n, d.prompt, d.gamma, d.mask_index)
    for k in abl.ks:
        add("k", k, 0, k, d.normalisation, d.prompt, d.gamma, d.mask_index)
    for b in range(len(banks)):
        add("bank", f"{_bank_name(banks[b])} ({banks[b].layout})", b, d.k, d.normalisation, d.prompt, d.gamma, d.mask_index)

    detection = []
    for b in range(len(banks)):
        for k in sorted({d.k, *abl.ks}):
            det = {"bank": _bank_name(banks[b]), "layout": banks[b].layout, "k": k}
            det.update(_detection_metrics(ctx, b, k))
            det["baseline_threshold_0.5"] = baseline_scores(ctx, b, k, per_slice=theirs if (b, k) == (0, d.k) else None)
            detection.append(det)

    # The default against the 0.5-threshold baseline, slice by slice (paired bootstrap intervals)
    comparison = None
    if mine:
        by_subject = all(o >= 0 for o, _ in mine)  # volumes: each slice belongs to a subject
        comparison = paired_bootstrap([v for _, v in mine], [v for _, v in theirs],
                                      groups=[o for o, _ in mine] if by_subject else None)
        comparison["bank"] = _bank_name(banks[0])
        if by_subject:
            vd_default = rows[n_rows]["volume_dice_per_subject"]
            vd_base = next(det["baseline_threshold_0.5"] for det in detection if det["k"] == d.k)["volume_dice_per_subject"]
            comparison["per_subject"] = [
                {"subject": u.name, "anomalous_slices": int(sum(o == i for o, _ in mine)),
                 "slice_dice": _mean_of(mine, i), "baseline_slice_dice": _mean_of(theirs, i),
                 "volume_dice": vd_default[i], "baseline_volume_dice": vd_base[i]}
                for i, u in enumerate(u for u in units if u.is_volume)
            ]
            # volume Dice, subject by subject (the lesion-free subjects count: 1 if left empty)
            comparison["volume"] = paired_bootstrap(vd_default, vd_base, groups=list(range(len(vd_default))))

    n_slices = sum(len(u.frames) for u in units)
    return {
        "rows": rows,
        "detection": detection,
        "default_vs_baseline": comparison,
        "data": {
            "units": [u.name for u in units],
            "slices": n_slices,
            "anomalous_slices": int(sum(u.labels.sum() for u in units)),
            "volumes": sum(u.is_volume for u in units),
        },
        "backbone": info,
        "banks": [{"path": str(bk.path), "summary": bk.summary()} for bk in banks],
        "default_settings": {"prompt": d.prompt, "gamma": d.gamma, "mask": d.mask_index, "k": d.k, "normalisation": d.normalisation},
        "timings_s": {"encode": round(t_enc, 1), "total": round(time.perf_counter() - t0, 1), "decode_passes": len(ctx.passes)},
    }


def _mean_of(pairs: list[tuple[int, float]], owner: int) -> float | None:
    vals = [v for o, v in pairs if o == owner]
    return float(np.mean(vals)) if vals else None


def _bank_name(bank: MemoryBank) -> str:
    return bank.path.name if bank.path else "bank"
