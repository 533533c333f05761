"""Tests of napari_mias_sam.evaluation.metrics against independent computations (sklearn, skimage, loops)."""

from __future__ import annotations

import ast
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import roc_auc_score

from napari_mias_sam.evaluation import metrics as M


# ------------------------------------------------------------------ independent references


def brute_dice(p, g, empty_value=1.0):
    p = [bool(v) for v in np.asarray(p).ravel()]
    g = [bool(v) for v in np.asarray(g).ravel()]
    inter = sum(1 for a, b in zip(p, g) if a and b)
    tot = sum(p) + sum(g)
    return empty_value if tot == 0 else 2 * inter / tot


def brute_pro_curve(maps, gts, thresholds):
    """Loop over thresholds; skimage labels components per slice (8-connectivity)."""
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    gts = [np.asarray(g, dtype=bool) for g in gts]
    regions = []  # (slice index, boolean region mask)
    for i, g in enumerate(gts):
        lab = sk_label(g, connectivity=2)
        for r in range(1, lab.max() + 1):
            regions.append((i, lab == r))
    n_normal = sum(int((~g).sum()) for g in gts)
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        binary = [m >= t for m in maps]
        overlaps = [binary[i][reg].sum() / reg.sum() for i, reg in regions]
        fp = sum(int((b & ~g).sum()) for b, g in zip(binary, gts))
        fprs.append(fp / n_normal)
        pros.append(float(np.mean(overlaps)))
    return fprs, pros


def brute_area(fprs, pros, max_fpr):
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # cut the segment at max_fpr
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def brute_aupro(maps, gts, max_fpr=0.3, num_thresholds=None):
    allv = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    if num_thresholds is None:
        thresholds = sorted(set(allv.tolist()), reverse=True)
    else:
        thresholds = np.linspace(allv.max(), allv.min(), num_thresholds)
    return brute_area(*brute_pro_curve(maps, gts, thresholds), max_fpr)


def blob_case(rng, n=4, shape=(12, 13), levels=None):
    """Small slices with a few GT blobs (one slice normal) and noisy maps."""
    gts = np.zeros((n,) + shape, dtype=bool)
    gts[0, 2:5, 3:7] = True
    gts[0, 8:11, 9:12] = True  # second component, same slice
    gts[1, 5:6, 5:6] = True  # one-pixel component
    gts[1, 1:3, 10:13] = True
    gts[2, 4:10, 2:6] = True
    # gts[3] stays empty: a normal slice
    maps = rng.random((n,) + shape) + 0.6 * gts
    if levels is not None:
        maps = np.round(maps * levels) / levels  # many ties
    return maps, gts


# ------------------------------------------------------------------ module hygiene


def test_metrics_module_does_not_import_sklearn():
    tree = ast.parse(Path(M.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert names <= {"__future__", "collections", "dataclasses", "typing", "numpy", "scipy"}


def test_all_is_explicit_and_resolves():
    assert set(M.__all__) == {
        "dice", "slice_dice", "paper_slice_dice", "volume_dice", "dice_at_threshold",
        "roc_auc", "pixel_auroc", "image_auroc", "ProCurve", "pro_curve", "aupro",
    }
    for name in M.__all__:
        assert hasattr(M, name)


# ------------------------------------------------------------------ Dice


def test_dice_hand_cases():
    p = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)
    g = np.array([[1, 0, 0], [0, 1, 1]], dtype=bool)
    assert M.dice(p, g) == 2 * 2 / (3 + 3)
    assert M.dice(p, p) == 1.0
    assert M.dice(p, ~p) == 0.0
    assert M.dice(np.array([1, 0]), np.array([1, 1])) == 2 / 3  # 0/1 integers accepted


def test_dice_empty_conventions():
    z = np.zeros((3, 3), dtype=bool)
    one = z.copy()
    one[1, 1] = True
    assert M.dice(z, z) == 1.0
    assert M.dice(z, z, empty_value=0.0) == 0.0
    assert np.isnan(M.dice(z, z, empty_value=float("nan")))
    assert M.dice(one, z) == 0.0  # gt empty, pred not
    assert M.dice(one, z, empty_value=1.0) == 0.0
    assert M.dice(z, one) == 0.0


def test_dice_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(50):
        shape = tuple(rng.integers(1, 7, size=rng.integers(1, 4)))
        p = rng.random(shape) < rng.random()
        g = rng.random(shape) < rng.random()
        assert M.dice(p, g) == pytest.approx(brute_dice(p, g), abs=1e-15)


def test_dice_validation():
    with pytest.raises(ValueError, match="same shape"):
        M.dice(np.zeros((2, 3), bool), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="binary"):
        M.dice(np.array([0.2, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="binary"):
        M.dice(np.array([0, 1]), np.array([0, 2]))


def test_volume_dice():
    rng = np.random.default_rng(2)
    p = rng.random((5, 6, 4)) < 0.3
    g = rng.random((5, 6, 4)) < 0.3
    assert M.volume_dice(p, g) == pytest.approx(brute_dice(p, g), abs=1e-15)
    z = np.zeros((2, 2, 2), bool)
    nz = z.copy()
    nz[0, 0, 0] = True
    assert M.volume_dice(z, z) == 1.0
    assert M.volume_dice(nz, z) == 0.0
    assert M.volume_dice(z, nz) == 0.0
    with pytest.raises(ValueError, match="3D"):
        M.volume_dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="same shape"):
        M.volume_dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


def _tiny_volume():
    """(H, W, S) = (2, 3, 4) volume, slices along axis 2, worked out by hand."""
    gt = np.zeros((2, 3, 4), bool)
    pred = np.zeros((2, 3, 4), bool)
    # slice 0: gt 2 px, pred 1 of them -> 2*1/(1+2) = 2/3
    gt[0, 0, 0] = gt[0, 1, 0] = True
    pred[0, 0, 0] = True
    # slice 1: normal (empty gt) but pred has 3 px -> excluded from slice Dice
    pred[:, 0, 1] = True
    pred[1, 2, 1] = True
    # slice 2: gt 1 px, pred misses it -> 0
    gt[1, 1, 2] = True
    pred[0, 2, 2] = True
    # slice 3: gt 2 px, pred = gt -> 1
    gt[1, 0:2, 3] = True
    pred[1, 0:2, 3] = True
    return pred, gt


def test_slice_dice_tiny_volume_by_hand():
    pred, gt = _tiny_volume()
    r = M.slice_dice(pred, gt)
    assert r["per_slice"] == {0: 2 / 3, 2: 0.0, 3: 1.0}
    assert r["mean"] == pytest.approx((2 / 3 + 0 + 1) / 3, abs=1e-15)
    assert r["n_slices"] == 3
    assert r["n_total"] == 4
    # same volume with slices along axis 0
    r0 = M.slice_dice(np.moveaxis(pred, 2, 0), np.moveaxis(gt, 2, 0), axis=0)
    assert r0 == r
    # volume Dice sees the false positives of the normal slice: 2*(1+0+2)/(7+5)
    assert M.volume_dice(pred, gt) == pytest.approx(6 / 12, abs=1e-15)


def test_slice_dice_no_anomalous_slice_and_validation():
    r = M.slice_dice(np.ones((2, 2, 3), bool), np.zeros((2, 2, 3), bool))
    assert np.isnan(r["mean"]) and r["per_slice"] == {} and r["n_slices"] == 0
    with pytest.raises(ValueError, match="3D"):
        M.slice_dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="axis"):
        M.slice_dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2), bool), axis=3)


def test_paper_slice_dice_modes():
    pred, gt = _tiny_volume()
    preds = [pred[:, :, k] for k in range(4)]
    gts = [gt[:, :, k] for k in range(4)]
    # default: anomalous (non-empty GT) slices only
    r = M.paper_slice_dice(preds, gts)
    assert r["per_slice"] == {0: 2 / 3, 2: 0.0, 3: 1.0}
    assert r["mean"] == pytest.approx(5 / 9, abs=1e-15)
    assert (r["n_slices"], r["n_total"]) == (3, 4)
    # include_normal: the normal slice 1 counts 0
    r = M.paper_slice_dice(preds, gts, include_normal=True)
    assert r["per_slice"] == {0: 2 / 3, 1: 0.0, 2: 0.0, 3: 1.0}
    assert r["mean"] == pytest.approx(5 / 12, abs=1e-15)
    # an empty prediction on an empty GT also counts 0 there (reference convention)
    preds_empty1 = list(preds)
    preds_empty1[1] = np.zeros_like(preds[1])
    assert M.paper_slice_dice(preds_empty1, gts, include_normal=True)["per_slice"][1] == 0.0
    # labels: slice 1 labelled anomalous with an empty mask counts 0; slice 2 labelled normal
    r = M.paper_slice_dice(preds, gts, labels=[1, 1, 0, 1])
    assert r["per_slice"] == {0: 2 / 3, 1: 0.0, 3: 1.0}
    assert r["mean"] == pytest.approx(5 / 9, abs=1e-15)
    # stacked (n, H, W) array gives the same as the list
    assert M.paper_slice_dice(np.stack(preds), np.stack(gts)) == M.paper_slice_dice(preds, gts)
    # slice_dice on the volume agrees with the default mode
    assert M.slice_dice(pred, gt)["per_slice"] == M.paper_slice_dice(preds, gts)["per_slice"]


def test_paper_slice_dice_random_vs_loop():
    rng = np.random.default_rng(3)
    preds = [rng.random((5, 7)) < 0.3 for _ in range(20)]
    gts = [(rng.random((5, 7)) < 0.2) & (rng.random() < 0.6) for _ in range(20)]
    anomalous = [i for i, g in enumerate(gts) if g.any()]
    expected = np.mean([brute_dice(preds[i], gts[i]) for i in anomalous])
    assert M.paper_slice_dice(preds, gts)["mean"] == pytest.approx(expected, abs=1e-14)
    expected_all = np.mean([brute_dice(p, g) if g.any() else 0.0 for p, g in zip(preds, gts)])
    got = M.paper_slice_dice(preds, gts, include_normal=True)["mean"]
    assert got == pytest.approx(expected_all, abs=1e-14)


def test_paper_slice_dice_validation():
    z = np.zeros((2, 2), bool)
    with pytest.raises(ValueError, match="1 maps but 2"):
        M.paper_slice_dice([z], [z, z])
    with pytest.raises(ValueError, match="labels has 1 entries"):
        M.paper_slice_dice([z, z], [z, z], labels=[1])
    with pytest.raises(ValueError, match="same shape"):
        M.paper_slice_dice([z], [np.zeros((2, 3), bool)])
    with pytest.raises(ValueError, match="2D"):
        M.paper_slice_dice([np.zeros((2, 2, 2), bool)], [np.zeros((2, 2, 2), bool)])
    with pytest.raises(ValueError, match="no slices"):
        M.paper_slice_dice([], [])


def test_dice_at_threshold():
    maps = np.array([[[0.9, 0.5], [0.2, 0.7]], [[0.1, 0.6], [0.0, 0.0]], [[0.8, 0.1], [0.1, 0.1]]])
    gts = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [1, 0]]], dtype=bool)
    # slice 0: pred {(0,0),(1,1)} (0.5 is not > 0.5), gt {(0,0),(0,1)} -> 2*1/4; slice 2 -> 0
    r = M.dice_at_threshold(maps, gts, 0.5)
    assert r["per_slice"] == {0: 0.5, 2: 0.0}
    assert r["mean"] == 0.25
    r_list = M.dice_at_threshold(list(maps), list(gts), 0.5)
    assert r_list == r
    r = M.dice_at_threshold(maps, gts, 0.45, include_normal=True)
    assert r["per_slice"] == {0: 2 * 2 / 5, 1: 0.0, 2: 0.0}
    with pytest.raises(ValueError, match="NaN"):
        M.dice_at_threshold(np.full((2, 2), np.nan), np.zeros((2, 2), bool))


# ------------------------------------------------------------------ ROC AUC


def test_roc_auc_hand_cases():
    assert M.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert M.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert M.roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert M.roc_auc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5  # all tied
    # one tie between a positive and a negative: (1 + 0.5 + 1 + 1) / 4
    assert M.roc_auc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == 0.875
    assert M.roc_auc(np.array([True, False, True]), np.array([True, False, False])) == 0.75


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(4)
    for trial in range(40):
        n = int(rng.integers(2, 3000))
        if trial % 3 == 0:
            s = rng.integers(0, 4, size=n)  # heavy ties, integer scores
        elif trial % 3 == 1:
            s = np.round(rng.normal(size=n), 1).astype(np.float32)
        else:
            s = rng.random(n)
        y = rng.random(n) < rng.uniform(0.05, 0.95)
        y[0], y[1] = True, False  # both classes present
        assert M.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-10)


def test_roc_auc_exact_fraction():
    rng = np.random.default_rng(5)
    s = rng.integers(0, 10, size=500)
    y = rng.random(500) < 0.3
    pos, neg = s[y], s[~y]
    u = sum(Fraction(int((p > neg).sum())) + Fraction(int((p == neg).sum()), 2) for p in pos)
    assert M.roc_auc(s, y) == float(u / (len(pos) * len(neg)))


def test_roc_auc_large_matches_sklearn():
    rng = np.random.default_rng(6)
    n = 1_000_000
    y = rng.random(n) < 0.05
    s = (rng.random(n, dtype=np.float32) + 0.2 * y).astype(np.float32)
    s = np.round(s, 3)  # ties across classes
    assert M.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-10)


def test_roc_auc_validation():
    with pytest.raises(ValueError, match="only one class"):
        M.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="only one class"):
        M.roc_auc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="same shape"):
        M.roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="binary"):
        M.roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="no scores"):
        M.roc_auc([], [])


def test_pixel_and_image_auroc():
    rng = np.random.default_rng(7)
    maps, gts = blob_case(rng, levels=8)
    expected = roc_auc_score(gts.ravel(), maps.ravel())
    assert M.pixel_auroc(maps, gts) == pytest.approx(expected, abs=1e-10)
    assert M.pixel_auroc(list(maps), list(gts)) == pytest.approx(expected, abs=1e-10)
    # slices of different sizes in a list
    maps_l = [maps[0], maps[1][:6, :9]]
    gts_l = [gts[0], gts[1][:6, :9]]
    flat_m = np.concatenate([m.ravel() for m in maps_l])
    flat_g = np.concatenate([g.ravel() for g in gts_l])
    assert M.pixel_auroc(maps_l, gts_l) == pytest.approx(roc_auc_score(flat_g, flat_m), abs=1e-10)
    with pytest.raises(ValueError, match="same shape"):
        M.pixel_auroc([maps[0]], [gts[0][:5]])
    with pytest.raises(ValueError, match="only one class"):
        M.pixel_auroc(maps[3], gts[3])

    scores = rng.integers(0, 5, size=60).astype(float)
    labels = rng.random(60) < 0.5
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-10)
    with pytest.raises(ValueError, match="1D"):
        M.image_auroc(scores.reshape(6, 10), labels.reshape(6, 10))
    with pytest.raises(ValueError, match="60 image scores but 59"):
        M.image_auroc(scores, labels[:59])


# ------------------------------------------------------------------ PRO / AUPRO


@pytest.mark.parametrize("levels", [None, 5, 20])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force_exact(levels, max_fpr):
    rng = np.random.default_rng(8)
    maps, gts = blob_case(rng, levels=levels)
    expected = brute_aupro(list(maps), list(gts), max_fpr=max_fpr)
    assert M.aupro(maps, gts, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-10)
    assert M.aupro(list(maps), list(gts), max_fpr=max_fpr) == pytest.approx(expected, abs=1e-10)


def test_aupro_matches_brute_force_grid():
    rng = np.random.default_rng(9)
    maps, gts = blob_case(rng)
    expected = brute_aupro(list(maps), list(gts), num_thresholds=37)
    assert M.aupro(maps, gts, num_thresholds=37) == pytest.approx(expected, abs=1e-10)


def test_pro_curve_matches_brute_force_points():
    rng = np.random.default_rng(10)
    maps, gts = blob_case(rng, levels=6)
    curve = M.pro_curve(maps, gts)
    thresholds = sorted(set(maps.ravel().tolist()), reverse=True)
    fprs, pros = brute_pro_curve(list(maps), list(gts), thresholds)
    np.testing.assert_array_equal(curve.thresholds, [np.inf] + thresholds)
    np.testing.assert_allclose(curve.fpr, fprs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.pro, pros, rtol=0, atol=1e-12)
    assert (curve.fpr[0], curve.pro[0], curve.fpr[-1], curve.pro[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_aupro_components_are_per_slice_and_8_connected():
    # Two slices whose blobs overlap in (y, x): one 3D component if slices were linked.
    # Diagonal pixels: one component with 8-connectivity, two with 4-connectivity.
    gts = np.zeros((2, 6, 6), bool)
    gts[0, 1:3, 1:3] = True
    gts[1, 1:4, 1:4] = True
    gts[1, 4, 4] = True  # diagonal neighbour of (3, 3)
    maps = np.zeros((2, 6, 6))
    maps[0][gts[0]] = 1.0  # slice 0 blob found fully, slice 1 blob not at all
    curve = M.pro_curve(maps, gts)
    # at threshold 1.0: PRO = mean(1, 0) over 2 components, FPR = 0
    assert curve.pro[1] == pytest.approx(0.5, abs=1e-12) and curve.fpr[1] == 0.0
    curve4 = M.pro_curve(maps, gts, connectivity=1)
    assert curve4.pro[1] == pytest.approx(1 / 3, abs=1e-15)  # three components
    # (H, W, n) layout with axis=2 gives the same
    curve_ax = M.pro_curve(np.moveaxis(maps, 0, 2), np.moveaxis(gts, 0, 2), axis=2)
    np.testing.assert_array_equal(curve_ax.pro, curve.pro)


def test_aupro_perfect_and_inverted():
    rng = np.random.default_rng(11)
    _, gts = blob_case(rng)
    perfect = gts.astype(float)
    assert M.aupro(perfect, gts) == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(perfect + 0.1 * rng.random(gts.shape) * ~gts, gts) == pytest.approx(1.0, abs=1e-12)
    inverted = 1.0 - perfect + 0.01 * rng.random(gts.shape)
    assert M.aupro(inverted, gts) == 0.0
    assert M.aupro(perfect, gts, num_thresholds=10) == pytest.approx(1.0, abs=1e-12)
    # constant map: the curve is the diagonal, area to 0.3 is 0.3**2 / 2, normalised -> 0.15
    assert M.aupro(np.zeros(gts.shape), gts) == pytest.approx(0.15, abs=1e-12)


def test_aupro_validation():
    maps = np.random.default_rng(12).random((2, 4, 4))
    with pytest.raises(ValueError, match="every ground-truth mask is empty"):
        M.aupro(maps, np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="normal pixels"):
        M.aupro(maps, np.ones((2, 4, 4), bool))
    gts = np.zeros((2, 4, 4), bool)
    gts[0, 1, 1] = True
    with pytest.raises(ValueError, match="max_fpr"):
        M.aupro(maps, gts, max_fpr=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        M.aupro(maps, gts, num_thresholds=1)
    with pytest.raises(ValueError, match="connectivity"):
        M.aupro(maps, gts, connectivity=3)
    with pytest.raises(ValueError, match="same shape"):
        M.aupro(maps, gts[:, :3])
    with pytest.raises(ValueError, match="2D .* or 3D"):
        M.aupro(maps[None], gts[None])
    with pytest.raises(ValueError, match="NaN"):
        M.aupro(np.where(gts, np.nan, maps), gts)


def test_paired_bootstrap():
    from napari_mias_sam.evaluation.metrics import paired_bootstrap

    a = np.array([0.5, 0.6, 0.7, 0.8])
    r = paired_bootstrap(a, a - 0.1, groups=[0, 0, 1, 1])
    assert r["difference"] == pytest.approx(0.1) and r["ci95"] == pytest.approx([0.1, 0.1])
    assert r["ci95_groups"] == pytest.approx([0.1, 0.1]) and r["groups"] == 2
    assert (r["a_wins"], r["a_loses"], r["n"]) == (4, 0, 4)
    rng = np.random.default_rng(3)
    x, y = rng.random(200), rng.random(200)
    r = paired_bootstrap(x, y, n_resamples=4000, seed=1)
    assert r["ci95"][0] < r["difference"] < r["ci95"][1]
    se = np.std(x - y, ddof=1) / np.sqrt(200)  # the interval matches the normal approximation
    assert r["ci95"][1] - r["ci95"][0] == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert paired_bootstrap(x, y, seed=1) == paired_bootstrap(x, y, seed=1)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])
