"""Region study on a development split: per-region prompts, mask-map agreement and 3D regions
against the 0.5-threshold baseline, in slice Dice AND volume Dice (issue 12).

Run it on data that is NOT the benchmark's test set (a different seed), with the benchmark's bank::

    python benchmarks/make_benchmark_data.py --out dev --seed 7 --train 1 --test 16
    python benchmarks/region_study.py --bank bench/banks/paper1024 --images dev/test/images/*.nii.gz \\
        --gts dev/test/labels/*.nii.gz --work /tmp/region-study

Every variant predicts whole volumes (every slice, lesion-free ones included) from the same
cached embeddings and anomaly maps as ``mias-sam evaluate`` (k = 1, mask 3 unless the variant
says otherwise). Every level a variant uses comes from the bank's calibration (held-out normal
slices), none from the test volumes and none is read from the labels. ``--work`` keeps the maps
and the decoded masks, so a second run only recomputes the region logic. Printed: one row per
variant, slice Dice (paper: mean over anomalous slices), volume Dice (mean over subjects, the
lesion-free one included), paired bootstrap intervals over subjects of both differences to the
baseline, lesion-free slices given a mask, and decodes per volume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_mias_sam import prompts as P
from napari_mias_sam.backbones.base import Prompt
from napari_mias_sam.evaluation.sweep import EvalContext, TestUnit, encode_units, unit_maps, unit_scores
from napari_mias_sam.anomaly import image_scores
from napari_mias_sam.evaluation.metrics import paired_bootstrap, paper_slice_dice, volume_dice
from napari_mias_sam.pipeline import decode_one, slice_decision_threshold
from napari_mias_sam.preprocess import from_frame
from napari_mias_sam.regions import NormalLevels, agreeing_mask, anomalous_regions, normal_levels, region_piece, slice_regions
from napari_mias_sam.settings import SegmentSettings


class Decoder:
    """Decodes (unit, slice, box) once; keeps the three masks (frame, bool) on disk under ``work``."""

    def __init__(self, backbone, units: list[TestUnit], work: Path | None):
        self.bb, self.units, self.work = backbone, units, work
        self.mem: dict[str, np.ndarray] = {}
        self.new = 0
        self.file = work / "decodes.npz" if work else None
        if self.file and self.file.is_file():
            with np.load(self.file, allow_pickle=False) as z:
                self.mem = {k: z[k] for k in z.files}

    def masks(self, u: int, s: int, box: tuple[float, float, float, float]) -> np.ndarray:
        """(3, 256, 256) bool masks of the decoder for one box prompt."""
        key = f"{self.units[u].name}|{s}|" + ",".join(f"{v:.1f}" for v in box)
        if key not in self.mem:
            lg = decode_one(self.bb, self.units[u].embeddings[s], Prompt("box", box=tuple(float(v) for v in box)))[0]
            self.mem[key] = np.packbits(lg.astype(np.float32) > 0, axis=-1)
            self.new += 1
        return np.unpackbits(self.mem[key], axis=-1).astype(bool)

    def save(self) -> None:
        if self.file and self.new:
            tmp = self.file.with_suffix(".part.npz")
            np.savez(tmp, **self.mem)
            tmp.replace(self.file)


def to_grid(frame_masks: np.ndarray, u: TestUnit) -> np.ndarray:
    """(N, 256, 256) frame masks -> (N, H, W) bool on the slice grid."""
    return from_frame(frame_masks.astype(np.float32), u.frame) > 0.5


def choose(masks: np.ndarray, piece: np.ndarray, rule: str, agree: float = 0.5) -> np.ndarray:
    """The mask kept for one region piece. ``rule``: ``m3`` (the third mask), ``agree`` (the
    product's mask-map agreement, :func:`agreeing_mask`), ``clip`` (the third mask inside the
    piece), ``piece`` (the region itself)."""
    if rule == "m3":
        return masks[2]
    if rule == "clip":
        return masks[2] & piece
    if rule == "piece":
        return piece
    return agreeing_mask(masks, piece, 2, agree)


def region_prediction(dec: Decoder, ui: int, u: TestUnit, maps: np.ndarray, levels: NormalLevels, *, three_d: bool,
                      rule: str, pad: float = 0.0, agree: float = 0.5, carry: bool = False) -> tuple[np.ndarray, int]:
    """Frame masks (N, 256, 256) of one unit from per-region box prompts, and the decodes used.
    ``carry``: each 3D region starts at its most anomalous slice; a neighbour slice's box is the
    bounding box of the mask just made (padded 2 px) while the region is present there."""
    lab = anomalous_regions(maps, levels, foreground=u.foreground, three_d=three_d)
    out = np.zeros(maps.shape, bool)
    n_dec = 0
    if carry:
        for r in range(1, int(lab.max()) + 1):
            present = np.flatnonzero((lab == r).reshape(len(lab), -1).any(1))
            peaks = [float(maps[s][lab[s] == r].max()) for s in present]
            start = int(present[int(np.argmax(peaks))])

            def step(s: int, prev: np.ndarray | None) -> np.ndarray:
                piece = lab[s] == r
                src = prev if prev is not None and prev.any() else piece
                rows, cols = np.flatnonzero(src.any(1)), np.flatnonzero(src.any(0))
                p = 2.0 if src is prev else 0.0
                box = (max(0.0, cols[0] - p), max(0.0, rows[0] - p), min(255.0, cols[-1] + p), min(255.0, rows[-1] + p))
                m = choose(dec.masks(ui, int(s), box), piece, rule, agree)
                out[s] |= m
                return m

            first = step(start, None)
            n_dec += 1
            for direction in (-1, 1):
                prev, s = first, start + direction
                while 0 <= s < len(lab) and (lab[s] == r).any():
                    prev = step(s, prev)
                    n_dec += 1
                    s += direction
        return out, n_dec
    for s in np.flatnonzero(lab.reshape(len(lab), -1).any(1)):
        for reg in slice_regions(lab[s], maps[s], pad=pad):
            piece = region_piece(lab[s], reg)
            if rule == "piece":
                out[s] |= piece
                continue
            m = dec.masks(ui, int(s), reg.box)
            n_dec += 1
            out[s] |= choose(m, piece, rule, agree)
    return out, n_dec


def study(units: list[TestUnit], bank, backbone, *, cache=None, work: Path | None = None, maps_only: bool = False,
          only: list[str] | None = None) -> dict:
    encode_units(units, backbone, cache, None, 4)
    ctx = EvalContext(units, [bank], backbone, SegmentSettings(prompt="cog-box"), None, k_max=1)
    maps_file = work / "maps.npz" if work else None
    if maps_file and maps_file.is_file():
        with np.load(maps_file, allow_pickle=False) as z:
            cal = [z[f"cal{i}"] for i in range(len(units))]
            ref = [z[f"ref{i}"] for i in range(len(units))]
            img = [z[f"img{i}"] for i in range(len(units))]
    else:
        cal, ref = unit_maps(ctx, 0, 1, "calibrated"), unit_maps(ctx, 0, 1, "reference")
        img = [image_scores(s) for s in unit_scores(ctx, 0, 1)]
        if maps_file:
            np.savez(maps_file, **{f"cal{i}": m for i, m in enumerate(cal)}, **{f"ref{i}": m for i, m in enumerate(ref)},
                     **{f"img{i}": m for i, m in enumerate(img)})
    if maps_only:
        return {}
    dec = Decoder(backbone, units, work)
    entry = bank.manifest["calibration"]["per_k"]["1"]
    thr = slice_decision_threshold(bank, 1)

    def cog(ui: int, decision: bool) -> tuple[np.ndarray, int]:
        u, m = units[ui], cal[ui]
        out = np.zeros(m.shape, bool)
        n = 0
        for s in np.flatnonzero(u.foreground):
            if decision and not img[ui][s] > thr:
                continue
            b = P.cog_box(m[s], 5.0)
            if b is not None:
                out[s] = dec.masks(ui, int(s), b)[2]
                n += 1
        return out, n

    variants: dict[str, tuple[str, Callable[[int], tuple[np.ndarray, int]]]] = {
        "baseline": ("reference-normalised map > 0.5, no SAM (min-max over the test set)", lambda ui: (ref[ui], 0)),
        "cog-box": ("the current default: CoG box on every slice with anatomy, mask 3", lambda ui: cog(ui, False)),
        "cog-box + decision": ("the current default with --slice-decision", lambda ui: cog(ui, True)),
    }
    lv: dict[str, NormalLevels] = {}
    for eq in (0.0, 50.0, 90.0, 100.0):
        lv[f"q{eq:g}"] = normal_levels(entry, extent_quantile=eq)
    lv["s99 q50"] = normal_levels(entry, extent_quantile=50.0, seed_quantile=99.0)

    def reg(name: str, what: str, key: str, **kw) -> None:
        variants[name] = (what, lambda ui, key=key, kw=kw: region_prediction(dec, ui, units[ui], cal[ui], lv[key], **kw))

    for key in ("q0", "q50", "q90", "q100"):
        reg(f"regions 3D {key}: map", f"hysteresis regions (seed: max normal peak, extent: {key} of normal peaks) as the mask, no SAM", key, three_d=True, rule="piece")
    for key in ("q0", "q50", "q90", "q100"):
        reg(f"regions 3D {key}: mask 3", f"one box per region piece (3D, extent {key}), mask 3, united", key, three_d=True, rule="m3")
    for key in ("q50", "q100"):
        reg(f"regions 2D {key}: mask 3", f"one box per region piece (2D, extent {key}), mask 3, united", key, three_d=False, rule="m3")
    for key in ("q0", "q50", "q90", "q100"):
        reg(f"regions 3D {key}: agree", f"as mask 3, but a mask less than half inside its region is replaced by mask 2, 1 or the region", key, three_d=True, rule="agree")
    for key in ("q0", "q50", "q90"):
        reg(f"regions 3D {key}: clip", f"mask 3 clipped to its region piece", key, three_d=True, rule="clip")
    reg("regions 3D q50: agree, pad 4", "3D q50 agree, boxes padded by 4 px", "q50", three_d=True, rule="agree", pad=4.0)
    reg("regions 3D q50: carry, agree", "3D q50, each region from its most anomalous slice, neighbours boxed by the previous mask, agree", "q50", three_d=True, rule="agree", carry=True)
    reg("regions 3D s99 q50: agree", "seed at the 99th percentile of normal peaks (1.0), extent q50, agree", "s99 q50", three_d=True, rule="agree")

    if only:
        unknown = [n for n in only if n not in variants]
        if unknown:
            raise SystemExit(f"region_study: unknown variant(s) {unknown}; known: {list(variants)}")
        variants = {n: v for n, v in variants.items() if n in only or n == "baseline"}
    results = {}
    per_slice: dict[str, list[float]] = {}
    per_vol: dict[str, list[float]] = {}
    subject: list[int] = []
    for name, (what, fn) in variants.items():
        preds, gts, labels, vd, owner, fp, ndec = [], [], [], [], [], 0, 0
        for ui, u in enumerate(units):
            fm, n = fn(ui)
            ndec += n
            g = to_grid(fm, u)
            g[~u.foreground] = False
            preds.extend(g)
            gts.extend(u.gt)
            labels.extend(u.labels)
            owner.extend([ui] * len(g))
            vd.append(volume_dice(g, u.gt))
            fp += int(sum(bool(g[s].any()) for s in range(len(g)) if not u.labels[s]))
        sd = paper_slice_dice(preds, gts, labels=np.asarray(labels))
        per_slice[name] = [v for _, v in sorted(sd["per_slice"].items())]
        if not subject:
            subject = [owner[i] for i in sorted(sd["per_slice"])]
        per_vol[name] = vd
        results[name] = {"what": what, "slice_dice": sd["mean"], "volume_dice": float(np.mean(vd)), "fp_slices": fp,
                         "decodes_per_volume": ndec / len(units), "volume_dice_per_subject": [round(v, 4) for v in vd]}
        dec.save()
        print(f"{name}: slice {100 * sd['mean']:.2f} volume {100 * np.mean(vd):.2f} fp {fp} decodes {ndec}", flush=True)
    vol_ids = list(range(len(units)))
    for name in results:
        if name == "baseline":
            continue
        c = paired_bootstrap(per_slice[name], per_slice["baseline"], groups=subject)
        cv = paired_bootstrap(per_vol[name], per_vol["baseline"], groups=vol_ids)
        results[name].update(slice_diff=c["difference"], slice_ci_subjects=c["ci95_groups"], slice_ci_slices=c["ci95"],
                             volume_diff=cv["difference"], volume_ci_subjects=cv["ci95_groups"])
    return {"rows": results, "levels": {k: v.as_dict() for k, v in lv.items()}, "anomalous_slices": len(subject),
            "subjects": len(set(subject)), "volumes": len(units), "slice_decision_threshold": thr}


def markdown(res: dict) -> str:
    lines = [f"{res['volumes']} volumes, {res['anomalous_slices']} anomalous slices in {res['subjects']} lesion subjects. "
             "Dice in points; intervals: 95 % paired bootstrap over subjects of the difference to the baseline.", "",
             "| variant | slice Dice | vs baseline [95 %] | volume Dice | vs baseline [95 %] | lesion-free slices with a mask | decodes / volume |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        if name == "baseline":
            lines.append(f"| {name} | {100 * r['slice_dice']:.2f} | | {100 * r['volume_dice']:.2f} | | {r['fp_slices']} | 0 |")
            continue
        cs, cv = r["slice_ci_subjects"], r["volume_ci_subjects"]
        lines.append(f"| {name} | {100 * r['slice_dice']:.2f} | {100 * r['slice_diff']:+.2f} [{100 * cs[0]:+.2f}, {100 * cs[1]:+.2f}] | "
                     f"{100 * r['volume_dice']:.2f} | {100 * r['volume_diff']:+.2f} [{100 * cv[0]:+.2f}, {100 * cv[1]:+.2f}] | "
                     f"{r['fp_slices']} | {r['decodes_per_volume']:.1f} |")
    lines += ["", "Levels (calibrated map units): " + "; ".join(f"{k}: seed {v['seed']:.3f}, extent {v['extent']:.3f}" for k, v in res["levels"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from napari_mias_sam.backbones import load_backbone
    from napari_mias_sam.bank import check_compatible, load_bank
    from napari_mias_sam.cache import EmbeddingCache
    from napari_mias_sam.errors import MiasSamError
    from napari_mias_sam.evaluation.sweep import units_from_volumes
    from napari_mias_sam.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=Path, required=True)
    parser.add_argument("--images", type=Path, nargs="+", required=True)
    parser.add_argument("--gts", type=Path, nargs="+", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, help="folder for the maps and decoded masks (reused by later runs)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--maps-only", action="store_true", help="compute and keep the maps in --work, score nothing")
    parser.add_argument("--variants", help="comma-separated variant names to score (the baseline always)")
    a = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        bank = load_bank(a.bank)
        bb = load_backbone(bank.backbone["name"], None, a.device)
        check_compatible(bank, bb.describe())
        units = units_from_volumes(a.images, a.gts, bank)
    except MiasSamError as e:
        print(f"region_study: {e}", file=sys.stderr)
        return 2
    work = None
    if a.work:
        tag = hashlib.sha256(("|".join(map(str, a.images)) + str(a.bank.resolve())).encode()).hexdigest()[:12]
        work = a.work / tag
        work.mkdir(parents=True, exist_ok=True)
    res = study(units, bank, bb, cache=EmbeddingCache(), work=work, maps_only=a.maps_only,
                only=a.variants.split(",") if a.variants else None)
    if a.maps_only:
        print(f"maps kept in {work} ({time.perf_counter() - t0:.0f} s)")
        return 0
    print(markdown(res))
    print(f"\n{len(units)} volumes, {time.perf_counter() - t0:.0f} s")
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
