"""Region study on a development split: per-region box prompts, their levels, boxes and masks,
against the 0.5-threshold baseline, in slice Dice AND volume Dice (issue 12).

Run it on data that is NOT the benchmark's test set (a different seed), with the benchmark's bank::

    python benchmarks/make_benchmark_data.py --out dev --seed 7 --train 1 --test 16
    python benchmarks/region_study.py --bank bench/banks/paper1024 --images dev/test/images/*.nii.gz \\
        --gts dev/test/labels/*.nii.gz --work /tmp/region-study

Every variant predicts whole volumes (every slice, lesion-free ones included) from the same
cached embeddings and anomaly maps as ``mias-sam evaluate`` (k = 1). The ``shipped default`` row
runs the product's own code (:func:`napari_mias_sam.method.regions.decode_regions`); the other rows vary
one factor of it at a time (:data:`VARIANTS`). Every level a variant uses comes from the bank's calibration (held-out normal
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_mias_sam.method import prompts as P
from napari_mias_sam.method.prompts import Prompt
from napari_mias_sam.evaluation.sweep import EvalContext, TestUnit, encode_units, unit_maps, unit_scores
from napari_mias_sam.method.anomaly import image_scores
from napari_mias_sam.evaluation.metrics import paired_bootstrap, paper_slice_dice, volume_dice
from napari_mias_sam.pipeline.segment import decode_one, slice_decision_threshold
from napari_mias_sam.method.preprocess import from_frame
from napari_mias_sam.core.defaults import REGIONS_MASK
from napari_mias_sam.method.regions import (
    CORE_PAD,
    EXTENT_QUANTILE,
    SEED_QUANTILE,
    NormalLevels,
    anomalous_regions,
    bank_levels,
    normal_levels,
    region_cores,
)
from napari_mias_sam.pipeline.settings import SegmentSettings


# -- the previous default (issue 15: a box around each region's core), kept here so that the
# -- tables made with this study reproduce; the product now uses method/region_prompts.py.
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SliceRegion:
    """One region's part on one slice: its label, its box prompt (x0, y0, x1, y1), the piece's
    own bounding box ``extent_box``, its peak and area (frame pixels)."""

    label: int
    box: Box
    peak: float
    area: int
    extent_box: Box


def _padded(box: Box, pad: float, shape: tuple[int, int]) -> Box:
    h, w = shape
    return (max(0.0, box[0] - pad), max(0.0, box[1] - pad), min(w - 1.0, box[2] + pad), min(h - 1.0, box[3] + pad))


def _box_of(sl: tuple[slice, slice]) -> Box:
    """A ``find_objects`` slice as an inclusive (x0, y0, x1, y1) box."""
    r, c = sl
    return (float(c.start), float(r.start), float(c.stop - 1), float(r.stop - 1))


def slice_regions(labels_2d: np.ndarray, map_2d: np.ndarray, *, core: np.ndarray | None = None,
                  pad: float = CORE_PAD) -> list[SliceRegion]:
    """The regions present on one slice (each 2D piece of a label is one prompt), largest peak first.

    ``core``: the slice's :func:`region_cores`; a piece's box prompt is the bounding box of its
    core pixels widened by ``pad``. Without ``core``, or where the piece holds no core pixel, the
    piece's own bounding box is the prompt.
    """
    out: list[SliceRegion] = []
    shape = labels_2d.shape
    for lab in np.unique(labels_2d):
        if lab == 0:
            continue
        pieces, _ = ndimage.label(labels_2d == lab)
        for i, sl in enumerate(ndimage.find_objects(pieces), start=1):
            if sl is None:
                continue
            piece = pieces[sl] == i  # within the piece's own bounding box
            extent_box = _box_of(sl)
            inner = piece & core[sl] if core is not None else None
            box = extent_box
            if inner is not None and inner.any():
                x0, y0 = sl[1].start, sl[0].start
                ib = _box_of(ndimage.find_objects(inner.astype(np.int8))[0])
                box = _padded((ib[0] + x0, ib[1] + y0, ib[2] + x0, ib[3] + y0), pad, shape)
            out.append(SliceRegion(int(lab), box, float(map_2d[sl][piece].max()), int(piece.sum()), extent_box))
    out.sort(key=lambda r: -r.peak)
    return out


def region_piece(labels_2d: np.ndarray, region: SliceRegion) -> np.ndarray:
    """The region's pixels inside its own bounding box on this slice (bool, frame)."""
    piece = np.zeros(labels_2d.shape, bool)
    x0, y0, x1, y1 = (int(round(v)) for v in region.extent_box)
    piece[y0:y1 + 1, x0:x1 + 1] = labels_2d[y0:y1 + 1, x0:x1 + 1] == region.label
    return piece


def regions_prompt(regions: list[SliceRegion]) -> Prompt | None:
    """The slice's prompt as recorded in results: one box, several boxes, or none."""
    if not regions:
        return None
    if len(regions) == 1:
        return Prompt("box", box=regions[0].box)
    return Prompt("boxes", boxes=tuple(r.box for r in regions))


def decode_regions(backbone, embedding, labels_2d: np.ndarray, map_2d: np.ndarray, *,
                   core: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Prompt | None]:
    """Decode one slice with one box per region piece (:func:`slice_regions`) and unite the masks.

    Returns (logits (3, 256, 256) float16, predicted IoUs (3,), the prompt). Slot ``i`` of the
    logits is the union, over regions, of decoder mask ``i + 1`` clipped to the piece it was
    prompted from (outside the piece its logits are capped at -1, so it is never foreground).
    IoUs: the best region's per slot.
    """
    regions = slice_regions(labels_2d, map_2d, core=core)
    shape = (3, *labels_2d.shape)
    if not regions:
        return np.zeros(shape, np.float16), np.full(3, np.nan, np.float32), None
    logits = np.full(shape, -np.inf, np.float32)
    ious = np.full(3, -np.inf, np.float32)
    emb = embedding.float() if hasattr(embedding, "float") else embedding
    for reg in regions:
        out = backbone.decode(emb, Prompt("box", box=reg.box))
        lg = np.asarray(out.logits, np.float32)
        ious = np.maximum(ious, np.asarray(out.iou, np.float32))
        logits = np.maximum(logits, np.where(region_piece(labels_2d, reg)[None], lg, np.minimum(lg, -1.0)))
    return logits.astype(np.float16), ious, regions_prompt(regions)


class Decoder:
    """Decodes (unit, slice, box) once; keeps the three masks (frame, bool) on disk under ``work``."""

    def __init__(self, backbone, units: list[TestUnit], work: Path | None):
        self.bb, self.units, self.work = backbone, units, work
        self.tags = [_unit_tag(u) for u in units]
        self.mem: dict[str, np.ndarray] = {}
        self.new = 0
        self.file = work / "decodes.npz" if work else None
        if self.file and self.file.is_file():
            with np.load(self.file, allow_pickle=False) as z:
                self.mem = {k: z[k] for k in z.files}

    def masks(self, u: int, s: int, box: tuple[float, float, float, float]) -> np.ndarray:
        """(3, 256, 256) bool masks of the decoder for one box prompt."""
        key = f"{self.tags[u]}|{s}|" + ",".join(f"{v:.1f}" for v in box)
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


def _unit_tag(u: TestUnit) -> str:
    """A unit's content hash (its encoder frames): its maps are kept under it."""
    return hashlib.sha256(u.frames.numpy().tobytes()).hexdigest()[:12]


@dataclass(frozen=True)
class Variant:
    """One region design: levels (percentiles of the held-out normal peaks), how a piece's box is
    made, which decoder mask is kept, whether it is clipped to its piece, 3D or per-slice regions."""

    seed: float = SEED_QUANTILE
    extent: float = EXTENT_QUANTILE
    box: str = "core"  # "core": the piece's pixels above the core level, padded; "region": the piece's own box
    core: float | None = None  # the core level's percentile (None: the seed's)
    pad: float = CORE_PAD
    mask: int = REGIONS_MASK
    clip: bool = True
    three_d: bool = True
    no_sam: bool = False  # the region itself as the mask

    def levels(self, entry: dict) -> NormalLevels:
        return normal_levels(entry, extent_quantile=self.extent, seed_quantile=self.seed)


def region_prediction(dec: Decoder, ui: int, u: TestUnit, maps: np.ndarray, entry: dict, v: Variant) -> tuple[np.ndarray, int]:
    """Frame masks (N, 256, 256) of one unit with one box per region piece, and the decodes used."""
    lv = v.levels(entry)
    lab = anomalous_regions(maps, lv, foreground=u.foreground, three_d=v.three_d)
    core_level = lv.seed if v.core is None else normal_levels(entry, seed_quantile=v.core).seed
    out = np.zeros(maps.shape, bool)
    n_dec = 0
    for s in np.flatnonzero(lab.reshape(len(lab), -1).any(1)):
        core = (lab[s] > 0) & (maps[s] > core_level) if v.box == "core" else None
        for reg in slice_regions(lab[s], maps[s], core=core, pad=v.pad):
            piece = region_piece(lab[s], reg)
            if v.no_sam:
                out[s] |= piece
                continue
            m = dec.masks(ui, int(s), reg.box)[v.mask - 1]
            n_dec += 1
            out[s] |= (m & piece) if v.clip else m
    return out, n_dec


def product_prediction(bb, u: TestUnit, maps: np.ndarray, levels: NormalLevels) -> tuple[np.ndarray, int]:
    """The shipped default (``segment`` on a volume): the product's own region and decode code."""
    lab = anomalous_regions(maps, levels, foreground=u.foreground, three_d=u.is_volume)
    cores = region_cores(maps, lab, levels)
    out = np.zeros(maps.shape, bool)
    n = 0
    for s in np.flatnonzero(lab.reshape(len(lab), -1).any(1)):
        lg, _, prompt = decode_regions(bb, u.embeddings[s], lab[s], maps[s], core=cores[s])
        out[s] = lg[REGIONS_MASK - 1].astype(np.float32) > 0
        n += 1 if prompt is None or prompt.kind == "box" else len(prompt.boxes)
    return out, n


#: The variants the study scores (docs/results.md lists them all): one factor at a time around the
#: chosen design, then the previous session's design and its neighbours.
VARIANTS: dict[str, Variant] = {
    "regions (the default)": Variant(),
    "mask 2": Variant(mask=2),
    "mask 3": Variant(mask=3),
    "no clip": Variant(clip=False),
    "region box (no core)": Variant(box="region"),
    "core pad 4": Variant(pad=4.0),
    "core pad 8": Variant(pad=8.0),
    "core pad 16": Variant(pad=16.0),
    "core at q95": Variant(core=95.0),
    "core at q100": Variant(core=100.0),
    "seed q100": Variant(seed=100.0),
    "seed q95": Variant(seed=95.0),
    "extent q50": Variant(extent=50.0),
    "extent q75 (the second pick)": Variant(extent=75.0),
    "extent q90": Variant(extent=90.0),
    "extent q93": Variant(extent=93.0),
    "extent q97": Variant(extent=97.0),
    "2D regions": Variant(three_d=False),
    "regions, no SAM": Variant(no_sam=True),
    "dev half 1's pick: core pad 8, mask 2": Variant(pad=8.0, mask=2),
    "previous: seed q100, extent q90, region box, mask 3, clip": Variant(seed=100.0, extent=90.0, box="region", mask=3),
}


def study(units: list[TestUnit], bank, backbone, *, cache=None, work: Path | None = None, maps_only: bool = False,
          only: list[str] | None = None) -> dict:
    encode_units(units, backbone, cache, None, 4)
    ctx = EvalContext(units, [bank], backbone, SegmentSettings(prompt="cog-box", mask_index=3), None, k_max=1)
    files = [work / f"maps-{u.name}-{_unit_tag(u)}.npz" for u in units] if work else [None] * len(units)
    todo = [i for i, f in enumerate(files) if f is None or not f.is_file()]
    if todo:  # one search for every unit (the maps of a unit do not depend on the others)
        cal_all, ref_all = unit_maps(ctx, 0, 1, "calibrated"), unit_maps(ctx, 0, 1, "reference")
        img_all = [image_scores(s) for s in unit_scores(ctx, 0, 1)]
        for i in todo:
            if files[i] is not None:
                np.savez(files[i], cal=cal_all[i], ref=ref_all[i], img=img_all[i])
    cal, ref, img = [], [], []
    for i, f in enumerate(files):
        if f is not None and f.is_file():
            with np.load(f, allow_pickle=False) as z:
                cal.append(z["cal"]), ref.append(z["ref"]), img.append(z["img"])
        else:
            cal.append(cal_all[i]), ref.append(ref_all[i]), img.append(img_all[i])
    if maps_only:
        return {}
    dec = Decoder(backbone, units, work)
    entry = bank.manifest["calibration"]["per_k"]["1"]
    thr = slice_decision_threshold(bank, 1)
    levels = bank_levels(bank, 1)

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
        "shipped default": ("`mias-sam segment` on a volume: regions.decode_regions, mask 1", lambda ui: product_prediction(backbone, units[ui], cal[ui], levels)),
        "cog-box": ("the previous default: CoG box on every slice with anatomy, mask 3", lambda ui: cog(ui, False)),
        "cog-box + decision": ("the previous default with --slice-decision", lambda ui: cog(ui, True)),
    }
    for name, v in VARIANTS.items():
        variants[name] = (repr(v), lambda ui, v=v: region_prediction(dec, ui, units[ui], cal[ui], entry, v))

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
        t0 = time.perf_counter()
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
                         "decodes_per_volume": ndec / len(units), "volume_dice_per_subject": [round(v, 4) for v in vd],
                         "seconds_per_volume": (time.perf_counter() - t0) / len(units)}
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
    lv = {"default": levels.as_dict()}
    return {"rows": results, "levels": lv, "anomalous_slices": len(subject),
            "subjects": len(set(subject)), "volumes": len(units), "slice_decision_threshold": thr,
            "normal_peaks": len(entry.get("slice_max_map") or [])}


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
    lines += ["", "Levels of the default (calibrated map units): " + "; ".join(f"seed {v['seed']:.3f}, extent {v['extent']:.3f}" for v in res["levels"].values())
              + f" (from {res['normal_peaks']} held-out normal slices' peaks)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from napari_mias_sam.backbones import load_backbone
    from napari_mias_sam.bank import check_compatible, load_bank
    from napari_mias_sam.pipeline.embedding_cache import EmbeddingCache
    from napari_mias_sam.core.errors import MiasSamError
    from napari_mias_sam.evaluation.sweep import units_from_volumes
    from napari_mias_sam.data.volumes import atomic_write_text

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
        work = a.work / hashlib.sha256(str(a.bank.resolve()).encode()).hexdigest()[:12]
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
