"""Prompt study on a development split: what the threshold-free prompts of the bundled backbone
can reach against the 0.5-threshold baseline, with two label-reading upper bounds.

Run it on data that is NOT the benchmark's test set (a different seed), with the benchmark's bank::

    python benchmarks/make_benchmark_data.py --out dev --seed 7 --train 1 --test 16
    python benchmarks/prompt_study.py --bank bench/banks/paper1024 --images dev/test/images/*.nii.gz \\
        --gts dev/test/labels/*.nii.gz

Every variant segments the same anomalous slices from the same cached embeddings and anomaly maps
as ``mias-sam evaluate`` (k = 1, gamma 5, mask 3 unless the variant says otherwise). Printed: one
row per variant with its slice Dice (the paper's: mean over anomalous slices) and a paired
bootstrap of its difference to the baseline over slices and over subjects. The two ``oracle`` rows
read the ground truth and are upper bounds, not methods: the best of the three masks per slice
(what any mask-choice rule could reach from the default box) and the ground truth's own bounding
box (what the decoder can do with a perfect box). ``docs/results.md`` holds the measured table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_mias_sam.method import prompts as P
from napari_mias_sam.method.prompts import Prompt
from napari_mias_sam.core.defaults import GAMMA
from napari_mias_sam.evaluation.sweep import EvalContext, TestUnit, baseline_scores, encode_units, unit_maps
from napari_mias_sam.evaluation.metrics import dice, paired_bootstrap
from napari_mias_sam.pipeline.segment import decode_one
from napari_mias_sam.method.preprocess import from_frame, to_frame
from napari_mias_sam.pipeline.settings import SegmentSettings

Box = tuple[float, float, float, float]
#: (name, what it is, reads labels)
VARIANTS: tuple[tuple[str, str, bool], ...] = (
    ("baseline", "0.5-threshold baseline: reference-normalised map > 0.5, no SAM", False),
    ("cog-box 2.0", "the default: CoG box, x_c +/- 2 sigma_x, y_c +/- 2 sigma_y (gamma 5)", False),
    ("cog-box 1.5", "CoG box, 1.5 sigma", False),
    ("cog-box 2.5", "CoG box, 2.5 sigma", False),
    ("cog-box refined", "the default box, then a second decode with its mask's bounding box", False),
    ("cog-box z-smoothed", "CoG box on the map averaged with its neighbour slices (1/4, 1/2, 1/4)", False),
    ("local cog-box", "CoG box whose moments are recomputed inside the first 1.5-sigma window (one mean-shift step), 2.5 sigma", False),
    ("quantile box", "box between the 2 % and 98 % weighted quantiles of the gamma-weighted map's x and y marginals", False),
    ("sharp-spread box", "CoG (gamma 5) +/- 2.5 sigma, the spread weighted with gamma 8", False),
    ("threshold-box", "boxes of the calibrated map's components above 0.5 (the paper's ablation)", False),
    ("oracle: best mask", "the best of the default box's 3 masks, slice by slice (reads labels)", True),
    ("oracle: GT box", "the ground truth's bounding box as the prompt (reads labels)", True),
)


def bounding_box(mask: np.ndarray) -> Box | None:
    """(x0, y0, x1, y1) of a 2D mask's true pixels, or ``None`` if it has none."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])


def moment_box(amap: np.ndarray, *, gamma: float = GAMMA, spread_gamma: float | None = None, n_sigma: float = 2.0,
               window: float | None = None) -> Box | None:
    """CoG +/- ``n_sigma`` weighted standard deviations. ``spread_gamma``: weight the spread with
    another exponent; ``window``: recompute centre and spread once, inside the first
    +/- ``window`` sigma box (one mean-shift step)."""
    w = P.cog_weights(amap, gamma)
    if w is None:
        return None
    rows, cols = np.indices(w.shape)

    def moments(wt: np.ndarray) -> tuple[float, float]:
        t = wt.sum()
        return float((wt * cols).sum() / t), float((wt * rows).sum() / t)

    def spread(wt: np.ndarray, xc: float, yc: float) -> tuple[float, float]:
        t = wt.sum()
        return float(np.sqrt((wt * (cols - xc) ** 2).sum() / t)), float(np.sqrt((wt * (rows - yc) ** 2).sum() / t))

    xc, yc = moments(w)
    ws = w if spread_gamma is None else P.cog_weights(amap, spread_gamma)
    sx, sy = spread(ws, xc, yc)
    if window is not None:
        inside = w * ((np.abs(cols - xc) <= window * sx) & (np.abs(rows - yc) <= window * sy))
        if inside.sum() > 0:
            xc, yc = moments(inside)
            sx, sy = spread(inside, xc, yc)
    hx, hy = max(n_sigma * sx, 2.0), max(n_sigma * sy, 2.0)
    hi = w.shape[1] - 1.0, w.shape[0] - 1.0
    return max(0.0, xc - hx), max(0.0, yc - hy), min(hi[0], xc + hx), min(hi[1], yc + hy)


def quantile_box(amap: np.ndarray, q: float = 0.02, gamma: float = GAMMA) -> Box | None:
    """Box between the ``q`` and ``1 - q`` weighted quantiles of the map's x and y marginals."""
    w = P.cog_weights(amap, gamma)
    if w is None:
        return None

    def bounds(marginal: np.ndarray) -> tuple[float, float]:
        c = np.cumsum(marginal) / marginal.sum()
        return float(np.searchsorted(c, q)), float(np.searchsorted(c, 1.0 - q))

    (x0, x1), (y0, y1) = bounds(w.sum(0)), bounds(w.sum(1))
    return x0, y0, x1, y1


def z_smoothed(maps: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Each slice's map averaged with its neighbours' (weights 1/4, 1/2, 1/4), empty slices kept 0."""
    out = ndimage.convolve1d(maps, [0.25, 0.5, 0.25], axis=0, mode="nearest")
    out[~foreground] = 0.0
    return out


def slice_dices(unit: TestUnit, calibrated: np.ndarray, backbone,
                gamma: float = GAMMA) -> tuple[dict[str, list[float]], list[tuple[float, float]]]:
    """Per SAM variant (every variant but the baseline), the Dice of each anomalous slice of one
    unit (0 where a variant gives no mask), and per slice the default box's width and height over
    the ground truth's bounding box's."""
    out: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS[1:]}
    ratios: list[tuple[float, float]] = []
    zmaps = z_smoothed(calibrated, unit.foreground)
    for s in np.flatnonzero(unit.labels):
        gt = unit.gt[s]

        def on_grid(frame_logits: np.ndarray) -> np.ndarray:
            """Frame logits -> the slice's mask, as ``evaluate`` does."""
            return from_frame(frame_logits[None].astype(np.float32), unit.frame)[0] > 0

        def decode(prompt: Prompt | None) -> np.ndarray:
            return decode_one(backbone, unit.embeddings[s], prompt)[0].astype(np.float32)

        def box(b: Box | None) -> Prompt | None:
            return None if b is None else Prompt("box", box=b)

        if not unit.foreground[s]:
            for name in out:
                out[name].append(0.0)
            continue
        m = calibrated[s]
        cog = P.cog_box(m, gamma)
        logits = decode(box(cog))
        variants: dict[str, Callable[[], np.ndarray]] = {
            "cog-box 2.0": lambda: logits[2],
            "cog-box 1.5": lambda: decode(box(P.cog_box(m, gamma, n_sigma=1.5)))[2],
            "cog-box 2.5": lambda: decode(box(P.cog_box(m, gamma, n_sigma=2.5)))[2],
            "cog-box refined": lambda: decode(box(bounding_box(logits[2] > 0)))[2],
            "cog-box z-smoothed": lambda: decode(box(P.cog_box(zmaps[s], gamma)))[2],
            "local cog-box": lambda: decode(box(moment_box(m, gamma=gamma, n_sigma=2.5, window=1.5)))[2],
            "quantile box": lambda: decode(box(quantile_box(m, 0.02, gamma)))[2],
            "sharp-spread box": lambda: decode(box(moment_box(m, gamma=gamma, spread_gamma=8.0, n_sigma=2.5)))[2],
            "threshold-box": lambda: decode(P.make_prompt(m, "threshold-box"))[2],
        }
        for name, fn in variants.items():
            out[name].append(dice(on_grid(fn()), gt))
        out["oracle: best mask"].append(max(dice(on_grid(logits[i]), gt) for i in range(3)))
        gt_frame = to_frame(gt[None].astype(np.float32))[0].numpy() > 0.5
        gt_box = bounding_box(gt_frame)
        out["oracle: GT box"].append(dice(on_grid(decode(box(gt_box))[2]), gt))
        if gt_box is not None and cog is not None:
            ratios.append(((cog[2] - cog[0]) / max(gt_box[2] - gt_box[0], 1.0), (cog[3] - cog[1]) / max(gt_box[3] - gt_box[1], 1.0)))
    return out, ratios


def study(units: list[TestUnit], bank, backbone, *, cache=None) -> dict:
    """Every variant's slice Dice and its paired comparison with the baseline."""
    encode_units(units, backbone, cache, None, 4)
    ctx = EvalContext(units, [bank], backbone, SegmentSettings(prompt="cog-box"), None, k_max=1)
    baseline: list[tuple[int, float]] = []  # (subject, Dice) per anomalous slice, in unit and slice order
    baseline_scores(ctx, 0, 1, per_slice=baseline)
    per: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    per["baseline"] = [v for _, v in baseline]
    subject = [o for o, _ in baseline]
    ratios: list[tuple[float, float]] = []
    for u, cal in zip(units, unit_maps(ctx, 0, 1, "calibrated")):
        d, r = slice_dices(u, cal, backbone)
        ratios.extend(r)
        for name, values in d.items():
            per[name].extend(values)
    if not subject:
        raise SystemExit("prompt_study: no anomalous slice in the test data (the ground truths are empty)")
    rows = []
    for name, what, oracle in VARIANTS:
        row = {"variant": name, "what": what, "reads_labels": oracle, "slice_dice": float(np.mean(per[name]))}
        if name != "baseline":
            cmp = paired_bootstrap(per[name], per["baseline"], groups=subject)
            row.update(difference=cmp["difference"], ci95=cmp["ci95"], ci95_groups=cmp.get("ci95_groups"),
                       wins=cmp["a_wins"], losses=cmp["a_loses"])
        rows.append(row)
    med = np.median(np.asarray(ratios), axis=0).tolist() if ratios else None
    return {"rows": rows, "anomalous_slices": len(subject), "subjects": len(set(subject)), "per_slice": per,
            "default_box_over_gt_box_median": med}


def markdown(res: dict) -> str:
    """The study as a Markdown table (Dice in points)."""
    lines = [f"{res['anomalous_slices']} anomalous slices in {res['subjects']} subjects; Dice in points; "
             "intervals: 95 % paired bootstrap of the difference to the baseline, over slices / over subjects.", "",
             "| variant | what | slice Dice | vs baseline | 95 % interval, slices | 95 % interval, subjects | wins / losses |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["variant"] == "baseline":
            lines.append(f"| {r['variant']} | {r['what']} | {100 * r['slice_dice']:.2f} | | | | |")
            continue
        ci, cg = r["ci95"], r["ci95_groups"]
        cg_txt = f"[{100 * cg[0]:+.2f}, {100 * cg[1]:+.2f}]" if cg else ""
        lines.append(f"| {r['variant']} | {r['what']} | {100 * r['slice_dice']:.2f} | {100 * r['difference']:+.2f} | "
                     f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] | {cg_txt} | {r['wins']} / {r['losses']} |")
    if res.get("default_box_over_gt_box_median"):
        w, h = res["default_box_over_gt_box_median"]
        lines += ["", f"The default box over the ground truth's bounding box (median over anomalous slices): {w:.2f} x the width, {h:.2f} x the height."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from napari_mias_sam.backbones import load_backbone
    from napari_mias_sam.bank import check_compatible, load_bank
    from napari_mias_sam.pipeline.embedding_cache import EmbeddingCache
    from napari_mias_sam.core.errors import MiasSamError
    from napari_mias_sam.evaluation.sweep import units_from_volumes
    from napari_mias_sam.data.volumes import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=Path, required=True, help="the memory bank (e.g. the benchmark's paper1024)")
    parser.add_argument("--images", type=Path, nargs="+", required=True, help="development volumes (NIfTI)")
    parser.add_argument("--gts", type=Path, nargs="+", required=True, help="their ground truths, in the same order")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    parser.add_argument("--json", type=Path, help="also write the rows and per-slice Dice here")
    a = parser.parse_args(argv)
    if a.json and a.json.exists():
        parser.error(f"--json {a.json} exists; name a new file (nothing is written over)")
    t0 = time.perf_counter()
    try:
        bank = load_bank(a.bank)
        bb = load_backbone(bank.backbone["name"], None, a.device)
        check_compatible(bank, bb.describe())
        units = units_from_volumes(a.images, a.gts, bank)
    except MiasSamError as e:  # a missing bank or weights, a mismatched backbone, a bad or unpaired volume
        print(f"prompt_study: {e}", file=sys.stderr)
        return 2
    res = study(units, bank, bb, cache=None if a.no_cache else EmbeddingCache())
    print(markdown(res))
    print(f"\n{len(units)} volumes, {time.perf_counter() - t0:.0f} s")
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
