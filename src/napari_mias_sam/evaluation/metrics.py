"""Evaluation metrics: Dice (paper slice Dice, per-volume 3D Dice), ROC AUC and AUPRO.

Pure numpy/scipy; no scikit-learn (the tests cross-check against it). Definitions follow
``docs/method.md`` ("Metrics"):

* Paper Dice: per-slice Dice averaged over the anomalous test slices only
  (:func:`paper_slice_dice` for a list of slices, :func:`slice_dice` for one volume).
* Volume Dice: one 3D Dice per subject (:func:`volume_dice`).
* P-AUROC: ROC AUC over all test pixels (:func:`pixel_auroc`); image AUROC from image scores
  (:func:`image_auroc`). Both use :func:`roc_auc`, which is exact (integer Mann-Whitney count,
  ties counted one half), equal to ``sklearn.metrics.roc_auc_score``.
* AUPRO: area under the per-region-overlap vs false-positive-rate curve up to ``max_fpr``,
  normalised by ``max_fpr`` (:func:`aupro`, curve from :func:`pro_curve`).

Masks are boolean arrays, or numeric arrays holding only 0 and 1; anything else raises
``ValueError`` (threshold continuous maps first, e.g. with :func:`dice_at_threshold`).

Size: one module on purpose (about 670 lines, half of it docstrings and input checks): every
metric the results report, defined once next to its siblings, with one import rule (numpy and
scipy only, pinned by a test) that a split would have to repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

__all__ = [
    "dice",
    "slice_dice",
    "paper_slice_dice",
    "volume_dice",
    "dice_at_threshold",
    "roc_auc",
    "pixel_auroc",
    "image_auroc",
    "ProCurve",
    "pro_curve",
    "aupro",
]

#: A stack of 2D slices: one array (H, W) or (n, H, W), or a sequence of 2D arrays
#: (their shapes may differ from one slice to the next).
SliceStack = Union[ArrayLike, Sequence[ArrayLike]]

# Positives handled per searchsorted call in roc_auc (bounds the temporary int64 arrays).
_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------


def _as_mask(x: ArrayLike, name: str) -> NDArray[np.bool_]:
    """Boolean view/copy of a binary mask; ValueError unless values are only 0/1."""
    a = np.asarray(x)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a boolean or 0/1 numeric mask, got dtype {a.dtype}")
    if a.size and not np.all((a == 0) | (a == 1)):
        raise ValueError(
            f"{name} must be binary (only 0 and 1, or booleans); threshold continuous maps first"
        )
    return a != 0


def _as_scores(x: ArrayLike, name: str) -> NDArray[Any]:
    """Real-valued finite scores (bool/int/float); ValueError otherwise."""
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def _pairs(maps: SliceStack, gts: SliceStack, *, axis: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pair maps with masks as a list of 3D ``(n, H, W)`` stacks, slices along axis 0.

    One ndarray (2D or 3D, slices along ``axis``) or a sequence of 2D arrays on each side.
    Masks are validated as binary; maps are returned as given (validate them separately).
    """
    if isinstance(maps, np.ndarray) or isinstance(gts, np.ndarray):
        m = np.asarray(maps)
        g = _as_mask(gts, "gts")
        _check_same_shape(m, g, "maps", "gts")
        if m.ndim == 2:
            return [(m[None], g[None])]
        if m.ndim == 3:
            if not -3 <= axis < 3:
                raise ValueError(f"axis must be in [-3, 2] for a 3D stack, got {axis}")
            return [(np.moveaxis(m, axis, 0), np.moveaxis(g, axis, 0))]
        raise ValueError(f"maps must be 2D (H, W) or 3D (n, H, W), got an array of shape {m.shape}")
    if isinstance(maps, (str, bytes)) or isinstance(gts, (str, bytes)):
        raise ValueError("maps and gts must be arrays or sequences of 2D arrays")
    maps_l, gts_l = list(maps), list(gts)
    if len(maps_l) != len(gts_l):
        raise ValueError(f"got {len(maps_l)} maps but {len(gts_l)} ground-truth masks")
    if not maps_l:
        raise ValueError("got no slices")
    out = []
    for i, (mi, gi) in enumerate(zip(maps_l, gts_l)):
        m = np.asarray(mi)
        g = _as_mask(gi, f"gts[{i}]")
        _check_same_shape(m, g, f"maps[{i}]", f"gts[{i}]")
        if m.ndim != 2:
            raise ValueError(f"maps[{i}] must be a 2D slice, got shape {m.shape}")
        out.append((m[None], g[None]))
    return out


# --------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------


def dice(pred: ArrayLike, gt: ArrayLike, *, empty_value: float = 1.0) -> float:
    """Binary Dice coefficient ``2 |P & G| / (|P| + |G|)`` of two same-shape masks.

    Parameters
    ----------
    pred, gt : array_like of bool (or 0/1)
        Predicted and ground-truth masks, any (equal) shape.
    empty_value : float, keyword-only
        Value returned when both masks are empty (default 1.0: nothing to find, nothing found).
        A non-empty ``pred`` with an empty ``gt`` always gives 0.0.

    Returns
    -------
    float
    """
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    _check_same_shape(p, g, "pred", "gt")
    n_p = int(np.count_nonzero(p))
    n_g = int(np.count_nonzero(g))
    if n_p + n_g == 0:
        return float(empty_value)
    inter = int(np.count_nonzero(p & g))
    return 2.0 * inter / (n_p + n_g)


def _slice_counts(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice |P & G|, |P|, |G| of boolean (n, H, W) stacks (int64 arrays of length n)."""
    axes = tuple(range(1, p.ndim))
    inter = np.count_nonzero(p & g, axis=axes).astype(np.int64)
    n_p = np.count_nonzero(p, axis=axes).astype(np.int64)
    n_g = np.count_nonzero(g, axis=axes).astype(np.int64)
    return inter, n_p, n_g


def slice_dice(pred_vol: ArrayLike, gt_vol: ArrayLike, *, axis: int = 2) -> dict[str, Any]:
    """Paper slice Dice of one volume: per-slice Dice averaged over its anomalous slices.

    A slice is anomalous when its ground truth is non-empty; normal slices (empty GT) are left
    out whatever the prediction on them (so false positives on normal slices do not count;
    see :func:`volume_dice` for a metric that sees them).

    Parameters
    ----------
    pred_vol, gt_vol : array_like of bool (or 0/1), 3D, same shape
    axis : int, keyword-only
        Slicing axis (default 2, axial in RAS-oriented NIfTI volumes).

    Returns
    -------
    dict
        ``"mean"``: float, mean Dice over anomalous slices (NaN when there is none);
        ``"per_slice"``: ``{slice_index: dice}`` for the anomalous slices, in index order;
        ``"n_slices"``: int, number of anomalous slices averaged;
        ``"n_total"``: int, number of slices in the volume.
    """
    p = _as_mask(pred_vol, "pred_vol")
    g = _as_mask(gt_vol, "gt_vol")
    _check_same_shape(p, g, "pred_vol", "gt_vol")
    if p.ndim != 3:
        raise ValueError(f"slice_dice needs 3D volumes, got shape {p.shape}")
    if not -3 <= axis < 3:
        raise ValueError(f"axis must be in [-3, 2], got {axis}")
    p = np.moveaxis(p, axis, 0)
    g = np.moveaxis(g, axis, 0)
    inter, n_p, n_g = _slice_counts(p, g)
    idx = np.flatnonzero(n_g > 0)
    per = {int(i): 2.0 * int(inter[i]) / int(n_p[i] + n_g[i]) for i in idx}
    mean = float(np.mean(list(per.values()))) if per else float("nan")
    return {"mean": mean, "per_slice": per, "n_slices": len(per), "n_total": int(p.shape[0])}


def paper_slice_dice(
    preds: SliceStack,
    gts: SliceStack,
    *,
    labels: ArrayLike | None = None,
    include_normal: bool = False,
) -> dict[str, Any]:
    """The paper's Dice over a list of 2D test slices (BMAD style).

    Each slice gets its own Dice with the reference convention that an EMPTY GROUND TRUTH
    SCORES 0.0 (whatever the prediction, even an empty one). Which slices are averaged:

    * default (``include_normal=False``): the anomalous slices only, i.e. those with
      ``labels == 1`` when ``labels`` is given (BMAD's ``Ungood`` folders), else those whose
      ground truth is non-empty. Without ``labels`` the 0.0 convention therefore never applies;
      with ``labels`` an anomalous-labelled slice whose mask is empty (e.g. lost in resizing)
      counts 0.0. This is the paper's number.
    * ``include_normal=True``: every slice given is averaged, and each normal (empty-GT) slice
      contributes 0.0. This is what the reference per-slice Dice gives when it is run over the
      whole test set instead of the anomalous part; it is lower and is not the paper's number.

    Parameters
    ----------
    preds, gts : (n, H, W) arrays or sequences of 2D arrays, bool or 0/1
    labels : array_like of bool or 0/1, shape (n,), keyword-only, optional
        Slice-level anomaly labels; default: anomalous = non-empty ground truth.
    include_normal : bool, keyword-only
        Average over all slices (normal ones score 0.0) instead of the anomalous ones.

    Returns
    -------
    dict
        ``"mean"`` (float, NaN when no slice is averaged), ``"per_slice"``
        (``{slice_index: dice}`` for the averaged slices), ``"n_slices"`` (number averaged),
        ``"n_total"`` (number of slices given).
    """
    pairs = _pairs(preds, gts)
    counts = [_slice_counts(_as_mask(p, "preds"), g) for p, g in pairs]
    inter = np.concatenate([c[0] for c in counts])
    n_p = np.concatenate([c[1] for c in counts])
    n_g = np.concatenate([c[2] for c in counts])
    n = inter.shape[0]
    if labels is None:
        anomalous = n_g > 0
    else:
        lab = _as_mask(labels, "labels").ravel()
        if lab.shape[0] != n:
            raise ValueError(f"labels has {lab.shape[0]} entries but {n} slices were given")
        anomalous = lab
    keep = np.ones(n, dtype=bool) if include_normal else anomalous
    per: dict[int, float] = {}
    for i in np.flatnonzero(keep):
        per[int(i)] = 2.0 * int(inter[i]) / int(n_p[i] + n_g[i]) if n_g[i] > 0 else 0.0
    mean = float(np.mean(list(per.values()))) if per else float("nan")
    return {"mean": mean, "per_slice": per, "n_slices": len(per), "n_total": int(n)}


def dice_at_threshold(
    maps: SliceStack,
    gts: SliceStack,
    thr: float = 0.5,
    *,
    labels: ArrayLike | None = None,
    include_normal: bool = False,
) -> dict[str, Any]:
    """Paper slice Dice of anomaly maps binarised as ``map > thr`` (maps already on the ground
    truth's grid; the pipeline's baseline masks come from :func:`.scoring.baseline_slices`).

    Same inputs, options and result as :func:`paper_slice_dice`, with continuous ``maps``
    (e.g. min-max normalised to [0, 1]) instead of masks.
    """
    thr = float(thr)
    if not np.isfinite(thr):
        raise ValueError(f"thr must be finite, got {thr}")
    pairs = _pairs(maps, gts)
    preds = [(_as_scores(m, "maps") > thr) for m, _ in pairs]
    masks = [g for _, g in pairs]
    if len(pairs) == 1:
        return paper_slice_dice(preds[0], masks[0], labels=labels, include_normal=include_normal)
    return paper_slice_dice(
        [p[0] for p in preds], [g[0] for g in masks], labels=labels, include_normal=include_normal
    )


def volume_dice(pred_vol: ArrayLike, gt_vol: ArrayLike) -> float:
    """3D Dice of one subject's volume.

    Empty ground truth: 1.0 if the prediction is empty too, else 0.0. Average the results over
    subjects for the dataset figure.

    Parameters
    ----------
    pred_vol, gt_vol : array_like of bool (or 0/1), 3D, same shape

    Returns
    -------
    float
    """
    p = _as_mask(pred_vol, "pred_vol")
    g = _as_mask(gt_vol, "gt_vol")
    _check_same_shape(p, g, "pred_vol", "gt_vol")
    if p.ndim != 3:
        raise ValueError(f"volume_dice needs 3D volumes, got shape {p.shape}")
    return dice(p, g, empty_value=1.0)


# --------------------------------------------------------------------------------------
# ROC AUC
# --------------------------------------------------------------------------------------


def _auc_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from sorted positive and negative scores: P(pos > neg) + 0.5 P(pos == neg).

    Counted exactly in integers (twice the Mann-Whitney U), then one correctly rounded division.
    """
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    twice_u = 0
    for start in range(0, n_pos, _CHUNK):
        chunk = pos[start : start + _CHUNK]
        below = np.searchsorted(neg, chunk, side="left")  # negatives strictly below
        below_or_tied = np.searchsorted(neg, chunk, side="right")
        twice_u += int(below.sum(dtype=np.int64)) + int(below_or_tied.sum(dtype=np.int64))
    return twice_u / (2 * n_pos * n_neg)  # Python int / int: correctly rounded


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve, exact, with ties counted one half.

    Equals the trapezoidal ROC AUC over distinct thresholds (what
    ``sklearn.metrics.roc_auc_score`` computes) and the normalised Mann-Whitney U statistic.
    Runs in O(n log n) with two sorts; fine for tens of millions of scores.

    Parameters
    ----------
    scores : array_like of real numbers
        Higher means more anomalous. Any shape; NaN/inf are rejected.
    labels : array_like of bool or 0/1, same shape
        1/True marks the positive (anomalous) class.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Shapes differ, input is empty, scores are not finite, labels are not binary, or only
        one class is present (AUC undefined).
    """
    s = _as_scores(scores, "scores")
    y = _as_mask(labels, "labels")
    _check_same_shape(s, y, "scores", "labels")
    if s.size == 0:
        raise ValueError("roc_auc got no scores")
    s = s.ravel()
    y = y.ravel()
    pos = s[y]
    neg = s[~y]
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            "ROC AUC is undefined when only one class is present "
            f"(got {pos.size} positive and {neg.size} negative labels)"
        )
    pos.sort()
    neg.sort()
    return _auc_sorted(pos, neg)


def pixel_auroc(maps: SliceStack, gts: SliceStack) -> float:
    """Pixel-level ROC AUC (P-AUROC) over all pixels of a stack or list of anomaly maps.

    Parameters
    ----------
    maps : array (any shape) or sequence of arrays
        Anomaly maps; higher means more anomalous.
    gts : same layout as ``maps``, bool or 0/1
        Ground-truth masks, each the shape of its map.

    Returns
    -------
    float
    """
    if isinstance(maps, np.ndarray) or isinstance(gts, np.ndarray):
        m = np.asarray(maps)
        g = _as_mask(gts, "gts")
        _check_same_shape(m, g, "maps", "gts")
        return roc_auc(m, g)
    maps_l, gts_l = list(maps), list(gts)
    if len(maps_l) != len(gts_l):
        raise ValueError(f"got {len(maps_l)} maps but {len(gts_l)} ground-truth masks")
    if not maps_l:
        raise ValueError("got no maps")
    ms, gs = [], []
    for i, (mi, gi) in enumerate(zip(maps_l, gts_l)):
        m = _as_scores(mi, f"maps[{i}]")
        g = _as_mask(gi, f"gts[{i}]")
        _check_same_shape(m, g, f"maps[{i}]", f"gts[{i}]")
        ms.append(m.ravel())
        gs.append(g.ravel())
    return roc_auc(np.concatenate(ms), np.concatenate(gs))


def image_auroc(image_scores: ArrayLike, image_labels: ArrayLike) -> float:
    """Image-level ROC AUC from one score and one 0/1 label per image (1D, same length)."""
    s = np.asarray(image_scores)
    y = np.asarray(image_labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(
            f"image_scores and image_labels must be 1D, got shapes {s.shape} and {y.shape}"
        )
    if s.shape != y.shape:
        raise ValueError(f"got {s.shape[0]} image scores but {y.shape[0]} labels")
    return roc_auc(s, y)


# --------------------------------------------------------------------------------------
# PRO / AUPRO
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProCurve:
    """A PRO curve: ``pro[i]`` against ``fpr[i]`` when binarising maps as ``map >= thresholds[i]``.

    Points are ordered by decreasing threshold (so ``fpr`` and ``pro`` never decrease); the
    first point is ``(0, 0)`` at threshold ``+inf``.
    """

    fpr: NDArray[np.float64]
    pro: NDArray[np.float64]
    thresholds: NDArray[np.float64]


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8-neighbours), got {connectivity}")
    return ndimage.generate_binary_structure(2, connectivity)


def _pro_inputs(
    maps: SliceStack, gts: SliceStack, *, axis: int, connectivity: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted normal scores, anomalous scores (descending) and their PRO weights (same order).

    Each anomalous pixel weighs 1 / area of its ground-truth connected component, components
    found per 2D slice.
    """
    pairs = _pairs(maps, gts, axis=axis)
    s2 = _structure(connectivity)
    s3 = np.zeros((3, 3, 3), dtype=bool)
    s3[1] = s2  # no links between slices: components per 2D slice
    negs, poss, ws = [], [], []
    for m, g in pairs:
        m = _as_scores(m, "maps")
        lab, n_comp = ndimage.label(g, structure=s3)
        negs.append(m[~g])
        if n_comp:
            area = np.bincount(lab.ravel(), minlength=n_comp + 1)
            l_pos = lab[g]
            poss.append(m[g])
            ws.append(1.0 / area[l_pos])
    neg = np.concatenate(negs)
    if neg.size == 0:
        raise ValueError("PRO needs normal pixels (gt == 0) to measure false positives; got none")
    if not poss:
        raise ValueError("PRO needs anomalous pixels (gt == 1); every ground-truth mask is empty")
    pos = np.concatenate(poss)
    w = np.concatenate(ws)
    neg.sort()
    order = np.argsort(pos, kind="stable")[::-1]
    return neg, pos[order], w[order]


def _curve_at(
    neg: np.ndarray, pos_desc: np.ndarray, w_desc: np.ndarray, thresholds_desc: np.ndarray
) -> ProCurve:
    """PRO and FPR at the given thresholds (descending), binarising as score >= threshold."""
    n_neg = neg.shape[0]
    n_fp = n_neg - np.searchsorted(neg, thresholds_desc, side="left")
    pos_asc = pos_desc[::-1]
    n_tp = pos_desc.shape[0] - np.searchsorted(pos_asc, thresholds_desc, side="left")
    cw = np.concatenate(([0.0], np.cumsum(w_desc, dtype=np.float64)))
    pro = cw[n_tp] / cw[-1]  # normalised by the total so that every pixel above gives exactly 1
    fpr = n_fp / n_neg
    return ProCurve(
        fpr=np.concatenate(([0.0], fpr)),
        pro=np.concatenate(([0.0], pro)),
        thresholds=np.concatenate(([np.inf], thresholds_desc.astype(np.float64))),
    )


def _distinct_desc(sorted_asc: np.ndarray) -> np.ndarray:
    if sorted_asc.size == 0:
        return sorted_asc
    keep = np.empty(sorted_asc.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(sorted_asc[1:], sorted_asc[:-1], out=keep[1:])
    return sorted_asc[keep][::-1]


def _thresholds(
    neg: np.ndarray, pos_desc: np.ndarray, num_thresholds: int | None, t_min: Any = None
) -> np.ndarray:
    """Descending thresholds: every distinct score (>= t_min) or a uniform grid."""
    if num_thresholds is not None:
        lo = min(neg[0], pos_desc[-1])
        hi = max(neg[-1], pos_desc[0])
        return np.linspace(float(hi), float(lo), int(num_thresholds))
    if t_min is not None:
        neg = neg[np.searchsorted(neg, t_min, side="left") :]
        pos_desc = pos_desc[: pos_desc.shape[0] - np.searchsorted(pos_desc[::-1], t_min, side="left")]
    both = np.concatenate((neg, pos_desc[::-1]))
    both.sort(kind="stable")  # two sorted runs: merged in linear time
    return _distinct_desc(both)


def _check_num_thresholds(num_thresholds: int | None) -> None:
    if num_thresholds is None:
        return
    if (
        isinstance(num_thresholds, bool)
        or not isinstance(num_thresholds, (int, np.integer))
        or num_thresholds < 2
    ):
        raise ValueError(f"num_thresholds must be None (exact) or an integer >= 2, got {num_thresholds!r}")


def pro_curve(
    maps: SliceStack,
    gts: SliceStack,
    *,
    num_thresholds: int | None = None,
    axis: int = 0,
    connectivity: int = 2,
) -> ProCurve:
    """Per-region-overlap (PRO) curve, MVTec AD style.

    At a threshold ``t`` the maps are binarised as ``map >= t``. PRO(t) is the mean, over every
    ground-truth connected component (found per 2D slice, ``connectivity`` 2 = 8-neighbours as
    in MVTec AD and BMAD), of the fraction of the component's pixels above ``t``.
    FPR(t) is the fraction of ALL normal pixels (gt == 0, on normal and anomalous slices alike)
    above ``t``.

    Parameters
    ----------
    maps, gts
        A 2D map, a 3D stack (slices along ``axis``) or a sequence of 2D maps; masks alike.
    num_thresholds : int or None, keyword-only
        None (default): exact curve, one point per distinct score value.
        An int: a uniform grid of that many thresholds from the highest to the lowest score.
    axis : int, keyword-only
        Slice axis when ``maps`` is a 3D array (default 0).
    connectivity : {1, 2}, keyword-only
        Component connectivity within a slice.

    Returns
    -------
    ProCurve
        Starting at ``(fpr, pro) = (0, 0)``, ending at ``(1, 1)``.
    """
    _check_num_thresholds(num_thresholds)
    neg, pos_desc, w_desc = _pro_inputs(maps, gts, axis=axis, connectivity=connectivity)
    thr = _thresholds(neg, pos_desc, num_thresholds)
    return _curve_at(neg, pos_desc, w_desc, thr)


def _area_to(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoidal area under pro(fpr) from 0 to max_fpr, linear interpolation at the cut."""
    k = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr
    x, y = fpr[:k], pro[:k]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))
    if k < fpr.shape[0] and x[-1] < max_fpr:
        x0, y0, x1, y1 = fpr[k - 1], pro[k - 1], fpr[k], pro[k]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_cut) * (max_fpr - x0)
    return area


def aupro(
    maps: SliceStack,
    gts: SliceStack,
    *,
    max_fpr: float = 0.3,
    num_thresholds: int | None = None,
    axis: int = 0,
    connectivity: int = 2,
) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (BMAD / MVTec AD AUPRO).

    The PRO-vs-FPR curve of :func:`pro_curve` is integrated with the trapezoid rule from
    FPR 0 to ``max_fpr``, the last segment linearly interpolated at ``max_fpr``, and divided by
    ``max_fpr``: a perfect detector scores 1.0, one that ranks every anomalous pixel below
    every normal pixel scores 0.0.

    By default the curve is exact (every distinct score is a threshold; only thresholds needed
    up to ``max_fpr`` are evaluated). ``num_thresholds=n`` uses a uniform grid of ``n``
    thresholds between the lowest and highest score instead (faster to plot, approximate).
    Note that BMAD's own script thresholds on a 200-step grid and rescales the kept FPRs by
    their maximum rather than interpolating at the cut, so its figures can differ slightly.

    Parameters
    ----------
    maps, gts
        As in :func:`pro_curve`.
    max_fpr : float, keyword-only
        Integration limit in (0, 1] (default 0.3).
    num_thresholds, axis, connectivity : keyword-only
        As in :func:`pro_curve`.

    Returns
    -------
    float in [0, 1]
    """
    max_fpr = float(max_fpr)
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    _check_num_thresholds(num_thresholds)
    neg, pos_desc, w_desc = _pro_inputs(maps, gts, axis=axis, connectivity=connectivity)
    t_min = None
    if num_thresholds is None:
        # Thresholds below the score at which FPR passes max_fpr are not needed; keep one
        # extra normal score of margin so that the first point past the cut is included.
        n_neg = neg.shape[0]
        j = int(np.floor(max_fpr * n_neg)) + 1  # this many top normals exceed max_fpr
        if j < n_neg:
            t_min = neg[n_neg - 1 - j]
    thr = _thresholds(neg, pos_desc, num_thresholds, t_min)
    curve = _curve_at(neg, pos_desc, w_desc, thr)
    return _area_to(curve.fpr, curve.pro, max_fpr) / max_fpr


def paired_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of two methods' per-item scores ``a`` and ``b`` (e.g. per-slice Dice).

    Returns the mean difference ``a - b`` with a 95 % percentile bootstrap interval over items
    and, when ``groups`` (e.g. the subject of each slice) is given, over whole groups (slices of
    one subject are not independent), plus counts of items where ``a`` wins or loses by more
    than 0.01. Deterministic for a given ``seed``.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must be non-empty and paired, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_resamples, diff.size))].mean(axis=1)
    out: dict[str, Any] = {
        "n": int(diff.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "difference": float(diff.mean()),
        "ci95": [float(v) for v in np.percentile(means, [2.5, 97.5])],
        "a_wins": int((diff > 0.01).sum()), "a_loses": int((diff < -0.01).sum()),
    }
    if groups is not None:
        g = np.asarray(groups).ravel()
        if g.shape != diff.shape:
            raise ValueError(f"groups must have one entry per item, got {g.shape} for {diff.shape}")
        ids = np.unique(g)
        sums = np.array([diff[g == i].sum() for i in ids])
        counts = np.array([(g == i).sum() for i in ids])
        pick = rng.integers(0, ids.size, size=(n_resamples, ids.size))
        gmeans = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
        out["groups"] = int(ids.size)
        out["ci95_groups"] = [float(v) for v in np.percentile(gmeans, [2.5, 97.5])]
    return out
