"""Lesion-wise evaluation as the BraTS challenges score it since 2023 (lesion-wise Dice and HD95).

The rule (Saluja et al., the BraTS 2023 lesion-wise metrics), on binary masks:

1. Ground-truth lesions are the 26-connected components of the ground truth; components whose
   dilations (``dilation`` iterations of the 18-neighbourhood) touch are combined into one lesion
   (the ground truth's voxels themselves do not change).
2. Predicted lesions are the prediction's connected components (or the ids a
   :func:`~napari_mias_sam.method.lesions.label_lesions` volume already gives them).
3. A true lesion is *detected* when a predicted lesion overlaps its dilation; its Dice and HD95
   are those of the union of every such predicted lesion against the true lesion. A *missed*
   true lesion scores Dice 0 and HD95 = ``hd95_penalty`` (374 mm, the BraTS value).
4. A predicted lesion that overlaps no true lesion's dilation is a *false positive*: it adds a
   Dice 0 and an HD95 of ``hd95_penalty`` to the case's means.
5. True lesions of at most ``gt_min_volume_mm3`` (BraTS-GLI: 50 mm^3) are left out of the counts
   and the means (predicted lesions touching them are not false positives either).
6. Lesion-wise Dice of a case = sum of the kept true lesions' Dice / (kept true lesions + false
   positives); lesion-wise HD95 likewise with the penalties. A case with neither scores Dice 1,
   HD95 0.

HD95 is the 95th percentile of the pooled symmetric surface distances in mm (surfaces: the
voxels a 6-neighbourhood erosion removes; distances: scipy's Euclidean distance transform with
the voxel spacing), as ``panoptica`` and ``medpy`` compute it. ``tests/evaluation/
test_lesionwise.py`` checks the counts, per-lesion Dice and HD95 against ``panoptica`` (the
implementation behind the official ``brats-evaluation`` package).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ..method.lesions import LesionRule, label_lesions, lesion_structure

__all__ = ["LesionwiseRule", "hd95", "lesionwise", "LESIONWISE_SUMMARY_KEYS", "summarise_cases"]

#: The per-case numbers every report shows (``segment --gt``, ``evaluate``, ``qa-report``).
LESIONWISE_SUMMARY_KEYS = ("lesionwise_dice", "lesionwise_hd95", "detected", "missed", "false_positives",
                           "gt_lesions", "pred_lesions")


@dataclass(frozen=True)
class LesionwiseRule:
    """The lesion-wise matching rule (defaults: BraTS 2023 GLI: dilation 3, 50 mm^3, 374 mm)."""

    dilation: int = 3
    gt_min_volume_mm3: float = 50.0
    hd95_penalty: float = 374.0
    connectivity: int = 26

    def as_dict(self) -> dict:
        return asdict(self)


def _border(m: np.ndarray) -> np.ndarray:
    return m ^ ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1))


def hd95(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between two masks; ``inf`` when either
    is empty (no surface to measure from)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        return float("inf")
    sp = np.asarray(spacing, dtype=np.float64)
    ba, bb = _border(a), _border(b)
    d_ab = ndimage.distance_transform_edt(~bb, sampling=sp)[ba]
    d_ba = ndimage.distance_transform_edt(~ba, sampling=sp)[bb]
    return float(np.percentile(np.hstack((d_ab, d_ba)), 95))


def _crop(boxes: list[tuple[slice, ...]], shape: tuple[int, ...], pad: int) -> tuple[slice, ...]:
    lo = [min(b[a].start for b in boxes) for a in range(len(shape))]
    hi = [max(b[a].stop for b in boxes) for a in range(len(shape))]
    return tuple(slice(max(0, lo[a] - pad), min(shape[a], hi[a] + pad)) for a in range(len(shape)))


def lesionwise(pred: np.ndarray, gt: np.ndarray, spacing=(1.0, 1.0, 1.0), rule: LesionwiseRule = LesionwiseRule(), *,
               pred_labels: np.ndarray | None = None) -> dict:
    """Score a predicted mask against a ground-truth mask lesion by lesion (module docstring).

    ``pred_labels``: the predicted lesions' ids (e.g. the ``<stem>_lesions.nii.gz`` volume); by
    default the prediction's connected components. Returns the case's lesion-wise Dice and HD95,
    the counts (detected, missed, false positives; true lesions too small to count), one row per
    true lesion (id, voxels, volume, the predicted ids that matched, Dice, HD95, status, centre)
    and one per predicted lesion (id, voxels, status ``matched`` / ``false positive``, the true
    lesions it matched)."""
    g = np.asarray(gt) != 0
    if pred_labels is None:
        plab = label_lesions(np.asarray(pred) != 0, LesionRule(connectivity=rule.connectivity, min_voxels=1))
    else:
        plab = np.asarray(pred_labels).astype(np.int64, copy=False)
    if plab.shape != g.shape:
        raise ValueError(f"prediction {plab.shape} and ground truth {g.shape} differ in shape")
    sp = tuple(float(s) for s in spacing)
    voxel_mm3 = float(np.prod(sp))
    struct = ndimage.generate_binary_structure(3, 2)
    conn = lesion_structure(rule.connectivity)
    gt_cc, n_cc = ndimage.label(g, structure=conn)
    if rule.dilation > 0 and n_cc:
        dil, _ = ndimage.label(ndimage.binary_dilation(g, structure=struct, iterations=rule.dilation), structure=conn)
        glab = np.where(g, dil, 0)  # true lesions combined by their dilations
        ids = [int(i) for i in np.unique(glab) if i]
        lut = np.zeros(int(glab.max()) + 1, dtype=np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        glab = lut[glab]
    else:
        glab = gt_cc.astype(np.int64)
    n_gt = int(glab.max())
    gboxes = ndimage.find_objects(glab)
    pboxes = ndimage.find_objects(plab)
    pred_ids = [i + 1 for i, b in enumerate(pboxes) if b is not None]
    matched_to: dict[int, list[int]] = {}
    gt_rows = []
    pad = rule.dilation + 1
    for j in range(1, n_gt + 1):
        box = _crop([gboxes[j - 1]], g.shape, pad)
        gj = glab[box] == j
        reach = ndimage.binary_dilation(gj, structure=struct, iterations=rule.dilation) if rule.dilation > 0 else gj
        hits = sorted(int(i) for i in np.unique(plab[box][reach]) if i)
        vol = float(gj.sum()) * voxel_mm3
        if hits:
            big = _crop([gboxes[j - 1]] + [pboxes[i - 1] for i in hits], g.shape, 1)
            gj_big = glab[big] == j
            pj = np.isin(plab[big], hits)
            inter = float(np.logical_and(gj_big, pj).sum())
            dice = 2.0 * inter / (float(gj_big.sum()) + float(pj.sum()))
            hd = hd95(gj_big, pj, sp)
            hd = rule.hd95_penalty if not np.isfinite(hd) else hd
        else:
            dice, hd = 0.0, rule.hd95_penalty
        counted = vol > rule.gt_min_volume_mm3
        for i in hits:
            matched_to.setdefault(i, []).append(j)
        centre = ndimage.center_of_mass(gj)
        gt_rows.append({
            "id": j, "voxels": int(gj.sum()), "volume_ml": vol / 1000.0, "pred_ids": hits, "dice": dice, "hd95": hd,
            "status": ("detected" if hits else "missed") if counted else "too small",
            "centre_voxel": [float(c + box[a].start) for a, c in enumerate(centre)],
            "bbox": [[int(gboxes[j - 1][a].start), int(gboxes[j - 1][a].stop - 1)] for a in range(3)],
        })
    fp = [i for i in pred_ids if i not in matched_to]
    pred_rows = [{"id": i, "voxels": int((plab[pboxes[i - 1]] == i).sum()),
                  "status": "matched" if i in matched_to else "false positive", "gt_ids": matched_to.get(i, [])}
                 for i in pred_ids]
    kept = [r for r in gt_rows if r["status"] != "too small"]
    denom = len(kept) + len(fp)
    if denom:
        lw_dice = sum(r["dice"] for r in kept) / denom
        lw_hd = (sum(r["hd95"] for r in kept) + len(fp) * rule.hd95_penalty) / denom
    else:
        lw_dice, lw_hd = 1.0, 0.0
    return {
        "lesionwise_dice": float(lw_dice),
        "lesionwise_hd95": float(lw_hd),
        "detected": sum(r["status"] == "detected" for r in gt_rows),
        "missed": sum(r["status"] == "missed" for r in gt_rows),
        "false_positives": len(fp),
        "too_small": sum(r["status"] == "too small" for r in gt_rows),
        "gt_lesions": len(kept),
        "pred_lesions": len(pred_ids),
        "gt": gt_rows,
        "pred": pred_rows,
        "rule": rule.as_dict(),
    }


def summarise_cases(cases: list[dict]) -> dict:
    """Means of the lesion-wise Dice and HD95 over cases and the summed counts."""
    if not cases:
        return {}
    out = {"cases": len(cases),
           "lesionwise_dice": float(np.mean([c["lesionwise_dice"] for c in cases])),
           "lesionwise_hd95": float(np.mean([c["lesionwise_hd95"] for c in cases]))}
    for k in ("detected", "missed", "false_positives", "too_small", "gt_lesions", "pred_lesions"):
        out[k] = int(sum(c.get(k, 0) for c in cases))
    return out
