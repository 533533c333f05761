"""MIAS-SAM in 3D study (issue 20): inside each anomalous region piece, a prompt made from the
gamma-weighted anomaly map; which of the decoder's masks agrees with the map; levels from the
bank's normal evidence. Scored against the 0.5-threshold baseline in slice Dice AND volume Dice.

Run it on a development split (never the test split while choosing)::

    python benchmarks/mias3d_study.py --bank BANK --images dev/test/images/*.nii.gz \\
        --gts dev/test/labels/*.nii.gz --work /tmp/mias3d

Maps come from ``benchmarks/region_study.py``'s cache (the same ``--work`` folder layout), decoded
masks are cached per prompt, so a variant costs only the decodes it has not seen. Every level a
variant uses comes from the bank's calibration (held-out normal slices); nothing reads the labels
except the scoring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from napari_mias_sam.evaluation.metrics import paired_bootstrap, paper_slice_dice, volume_dice  # noqa: E402
from napari_mias_sam.method import regions as R  # noqa: E402
from napari_mias_sam.method import region_prompts as RP  # noqa: E402
from napari_mias_sam.method.prompts import Prompt  # noqa: E402
from napari_mias_sam.pipeline.segment import decode_one  # noqa: E402
from napari_mias_sam.method.anomaly import image_scores  # noqa: E402
from napari_mias_sam.method.preprocess import from_frame  # noqa: E402


class RS:
    """The unit helpers (a namespace)."""

    @staticmethod
    def _unit_tag(u) -> str:
        """A unit's content hash (its encoder frames): its maps are kept under it."""
        return hashlib.sha256(u.frames.numpy().tobytes()).hexdigest()[:12]

    @staticmethod
    def to_grid(frame_masks: np.ndarray, u) -> np.ndarray:
        """(N, 256, 256) frame masks -> (N, H, W) bool on the slice grid."""
        return from_frame(frame_masks.astype(np.float32), u.frame) > 0.5


def cached_maps(units, bank, backbone, cache, work: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Calibrated maps, reference-normalised maps (min-max over all ``units``) and image scores
    of every unit, kept in ``work`` under the unit's content hash (one kNN search for all)."""
    from napari_mias_sam.evaluation.sweep import EvalContext, encode_units, unit_maps, unit_scores
    from napari_mias_sam.pipeline.settings import SegmentSettings

    files = [work / f"maps-{u.name}-{RS._unit_tag(u)}.npz" for u in units]
    if not all(f.is_file() for f in files):
        encode_units(units, backbone, cache, None, 4)
        ctx = EvalContext(units, [bank], backbone, SegmentSettings(prompt="cog-box", mask_index=3), None, k_max=1)
        cal_all, ref_all = unit_maps(ctx, 0, 1, "calibrated"), unit_maps(ctx, 0, 1, "reference")
        img_all = [image_scores(s) for s in unit_scores(ctx, 0, 1)]
        for f, c, r, i in zip(files, cal_all, ref_all, img_all):
            np.savez(f, cal=c, ref=r, img=i)
    out = ([], [], [])
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            out[0].append(z["cal"]), out[1].append(z["ref"]), out[2].append(z["img"])
    return out


class Decoder:
    """Decodes (unit, slice, prompt) once; keeps the three masks (frame, packed bool) on disk."""

    def __init__(self, backbone, units, work: Path | None):
        self.bb, self.units, self.work = backbone, units, work
        self.tags = [RS._unit_tag(u) for u in units]
        self.mem: dict[str, np.ndarray] = {}
        self.iou: dict[str, np.ndarray] = {}
        self.new = 0
        self.file = work / "decodes3d.npz" if work else None
        if self.file and self.file.is_file():
            with np.load(self.file, allow_pickle=False) as z:
                for k in z.files:
                    if k.startswith("iou|"):
                        self.iou[k[4:]] = z[k]
                    else:
                        self.mem[k] = z[k]

    def masks(self, u: int, s: int, prompt: Prompt) -> np.ndarray:
        vals = prompt.box if prompt.kind == "box" else prompt.point
        key = f"{self.tags[u]}|{s}|{prompt.kind}|" + ",".join(f"{v:.1f}" for v in vals)
        if key not in self.mem:
            lg, iou = decode_one(self.bb, self.units[u].embeddings[s], prompt)
            self.mem[key] = np.packbits(lg.astype(np.float32) > 0, axis=-1)
            self.iou[key] = np.asarray(iou, np.float32)
            self.new += 1
            if self.new % 200 == 0:
                self.save()
        return np.unpackbits(self.mem[key], axis=-1).astype(bool)

    def save(self) -> None:
        if self.file and self.new:
            tmp = self.file.with_suffix(".part.npz")
            np.savez(tmp, **self.mem, **{f"iou|{k}": v for k, v in self.iou.items()})
            tmp.replace(self.file)


# -- prompts inside a piece -----------------------------------------------------------------------
def weighted_moments(m: np.ndarray, piece: np.ndarray, gamma: float, sub: float = 0.0):
    """(xc, yc, sx, sy) of the weights ((m - sub)+ * piece)^gamma; None if all zero."""
    v = np.where(piece, np.clip(m - sub, 0.0, None), 0.0).astype(np.float64)
    top = v.max()
    if top <= 0:
        return None
    w = (v / top) ** gamma
    w /= w.sum()
    rows, cols = np.indices(w.shape)
    xc, yc = (w * cols).sum(), (w * rows).sum()
    sx = np.sqrt(max((w * (cols - xc) ** 2).sum(), 0.0))
    sy = np.sqrt(max((w * (rows - yc) ** 2).sum(), 0.0))
    return xc, yc, sx, sy


def clip_box(b, shape=(256, 256)):
    h, w = shape
    return (max(0.0, b[0]), max(0.0, b[1]), min(w - 1.0, b[2]), min(h - 1.0, b[3]))


@dataclass(frozen=True)
class Design:
    """One variant of the default."""

    prompt: str = "moments"  # "core": the current core box; "moments": CoG +/- (n sigma + pad); "core-cog": core box size at the CoG
    n_sigma: float = 2.0
    pad: float = 8.0
    min_half: float = 4.0
    sub: str = "none"  # subtract before weighting: "none", "extent"
    gamma: float = 5.0
    mask: int = 1  # the preferred mask
    rule: str = "none"  # "none", "switch" (best agreeing mask), "fallback" (region if the preferred disagrees), "both"
    agree: str = "dice-piece"  # agreement measure: "dice-piece", "dice-core", "mass"
    tau: float = 0.3
    fallback: str = "piece"  # "piece" or "core"
    clip: bool = True
    seed_q: float = R.SEED_QUANTILE
    extent_q: float = R.EXTENT_QUANTILE
    levels: str = "peaks"  # "peaks" (q of held-out slices' peaks), "tail", "pixel" (q of every held-out map pixel), "auto"


def piece_prompt(m, piece, core, lv, d: Design):
    if d.prompt == "core":
        inner = piece & core
        src = inner if inner.any() else piece
        ys, xs = np.nonzero(src)
        b = (xs.min(), ys.min(), xs.max(), ys.max())
        pad = d.pad if inner.any() else 0.0
        return Prompt("box", box=clip_box((b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad)))
    sub = lv.extent if d.sub == "extent" else 0.0
    mo = weighted_moments(m, piece, d.gamma, sub)
    if mo is None:
        mo = weighted_moments(m, piece, d.gamma, 0.0)
    xc, yc, sx, sy = mo
    if d.prompt == "core-cog":
        inner = piece & core
        src = inner if inner.any() else piece
        ys, xs = np.nonzero(src)
        hx = (xs.max() - xs.min()) / 2 + d.pad
        hy = (ys.max() - ys.min()) / 2 + d.pad
    else:  # the product's symmetric box (its centre stays the centre of gravity)
        return Prompt("box", box=RP.moment_box(xc, yc, sx, sy, m.shape, n_sigma=d.n_sigma, pad=d.pad, min_half=d.min_half))
    return Prompt("box", box=clip_box((xc - hx, yc - hy, xc + hx, yc + hy)))


def dice2(a, b):
    s = a.sum() + b.sum()
    return 2.0 * (a & b).sum() / s if s else 0.0


def agreement(mask, piece, core, m, d: Design, lv):
    if d.agree == "dice-piece":
        return dice2(mask & piece, piece)
    if d.agree == "dice-core":
        c = piece & core
        return dice2(mask & piece, c if c.any() else piece)
    if d.agree == "mass":  # share of the region's gamma-weighted anomaly under the mask, times the mask's precision
        w = np.where(piece, m, 0.0) ** d.gamma
        cov = (w * mask).sum() / max(w.sum(), 1e-12)
        prec = (mask & piece).sum() / max(mask.sum(), 1)
        return cov * prec
    raise ValueError(d.agree)


def choose(masks, piece, core, m, d: Design, lv):
    """(final mask, outcome) for one piece: outcome 1-3 = that mask, 0 = the region itself."""
    cand = [(masks[i] & piece) if d.clip else masks[i] for i in range(3)]
    if d.rule == "none":
        return cand[d.mask - 1], d.mask
    ag = [agreement(masks[i], piece, core, m, d, lv) for i in range(3)]
    if d.rule == "best":  # the best-agreeing mask, or the region when none reaches tau
        best = int(np.argmax(ag))
        if ag[best] >= d.tau:
            return cand[best], best + 1
        fb = piece & core if (d.fallback == "core" and (piece & core).any()) else piece
        return fb, 0
    pick = d.mask - 1
    if ag[pick] >= d.tau:
        return cand[pick], d.mask
    if d.rule in ("switch", "both"):
        best = int(np.argmax(ag))
        if ag[best] >= d.tau:
            return cand[best], best + 1
        if d.rule == "switch":
            return cand[best], best + 1
    if d.rule in ("fallback", "both"):
        fb = piece & core if (d.fallback == "core" and (piece & core).any()) else piece
        return fb, 0
    return cand[pick], d.mask


def levels_of(entry: dict, d: Design):
    method = {"peaks": "quantile", "tail": "tail", "pixel": "pixel", "auto": "auto"}[d.levels]
    return R.normal_levels(entry, extent_quantile=d.extent_q, seed_quantile=d.seed_q, method=method)


def predict(dec: Decoder, ui: int, u, m: np.ndarray, entry: dict, d: Design, stats: dict):
    lv = levels_of(entry, d)
    lab = R.anomalous_regions(m, lv, foreground=u.foreground, three_d=True)
    core_all = m > lv.seed
    out = np.zeros(m.shape, bool)
    n = 0
    for s in np.flatnonzero(lab.reshape(len(lab), -1).any(1)):
        pieces, npc = _pieces(lab[s])
        for piece in pieces:
            p = piece_prompt(m[s], piece, core_all[s], lv, d)
            masks = dec.masks(ui, int(s), p)
            fm, outcome = choose(masks, piece, core_all[s], m[s], d, lv)
            stats[outcome] = stats.get(outcome, 0) + 1
            out[s] |= fm
            n += 1
    return out, n


def product_predict(bb, u, m: np.ndarray, entry: dict, stats: dict) -> tuple[np.ndarray, int]:
    """The shipped default through the product's own code: the bank's levels (``method="auto"``),
    3D regions and cores, :func:`~napari_mias_sam.pipeline.segment.decode_all` with the regions
    prompt (gamma 5, mask 1, the mask-agreement rule); frame masks (N, 256, 256) bool."""
    from napari_mias_sam.pipeline.segment import EncodedVolume, decode_all
    from napari_mias_sam.pipeline.settings import SegmentSettings

    lv = R.normal_levels(entry)
    lab = R.anomalous_regions(m, lv, foreground=u.foreground, three_d=True)
    enc = EncodedVolume(u.embeddings, u.frames, u.foreground, 0, u.frame, "")
    details: list = []
    _, logits, _ = decode_all(enc, m, bb, SegmentSettings(prompt="regions", mask_index=1), regions=lab,
                              cores=R.region_cores(m, lab, lv), details=details)
    n = 0
    for d in details:
        if d is not None:
            for o in d.outcomes[0]:
                stats[int(o)] = stats.get(int(o), 0) + 1
                n += 1
    return logits[:, 0].astype(np.float32) > 0, n


def per_slice_predict(bb, u, m: np.ndarray) -> np.ndarray:
    """The backbone's per-slice prompt on every slice with anatomy (LiteMedSAM: ``cog-box``, mask 3),
    the volumes' default for banks below 34 held-out slices before issue 20 item 3."""
    from napari_mias_sam.method.prompts import default_prompt_for
    from napari_mias_sam.pipeline.segment import EncodedVolume, decode_all
    from napari_mias_sam.pipeline.settings import SegmentSettings

    enc = EncodedVolume(u.embeddings, u.frames, u.foreground, 0, u.frame, "")
    st = SegmentSettings(prompt=default_prompt_for(bb.name)).with_default_mask()
    _, logits, _ = decode_all(enc, m, bb, st)
    return logits[:, st.mask_index - 1].astype(np.float32) > 0


def _pieces(lab2d):
    from scipy import ndimage

    out = []
    for lab in np.unique(lab2d):
        if lab == 0:
            continue
        pcs, k = ndimage.label(lab2d == lab)
        out.extend(pcs == i for i in range(1, k + 1))
    return out, len(out)


def score(units, preds: dict[str, list[np.ndarray]]):
    """Per variant: slice Dice, volume Dice, CIs vs baseline, fp slices."""
    res = {}
    per_slice, per_vol, subject = {}, {}, []
    for name, fms in preds.items():
        P, G, L, vd, owner, fp = [], [], [], [], [], 0
        for ui, (u, fm) in enumerate(zip(units, fms)):
            g = RS.to_grid(fm, u)  # bool masks, or the baseline's map: resampled, then above 0.5
            g[~u.foreground] = False
            P.extend(g), G.extend(u.gt), L.extend(u.labels), owner.extend([ui] * len(g))
            vd.append(volume_dice(g, u.gt))
            fp += int(sum(bool(g[s].any()) for s in range(len(g)) if not u.labels[s]))
        sd = paper_slice_dice(P, G, labels=np.asarray(L))
        per_slice[name] = [v for _, v in sorted(sd["per_slice"].items())]
        if not subject:
            subject = [owner[i] for i in sorted(sd["per_slice"])]
        per_vol[name] = vd
        res[name] = {"slice": 100 * sd["mean"], "volume": 100 * float(np.mean(vd)), "fp": fp,
                     "per_volume": [round(100 * v, 1) for v in vd]}
    for name in res:
        if name == "baseline":
            continue
        c = paired_bootstrap(per_slice[name], per_slice["baseline"], groups=subject)
        cv = paired_bootstrap(per_vol[name], per_vol["baseline"], groups=list(range(len(units))))
        res[name].update(ds=100 * c["difference"], ds_ci=[100 * v for v in c["ci95_groups"]],
                         dv=100 * cv["difference"], dv_ci=[100 * v for v in cv["ci95_groups"]])
        ps = next((k for k in preds if k.startswith("per-slice")), None)
        if ps is not None and name != ps:  # also against the per-slice prompt (the small-bank default before)
            c = paired_bootstrap(per_slice[name], per_slice[ps], groups=subject)
            cv = paired_bootstrap(per_vol[name], per_vol[ps], groups=list(range(len(units))))
            res[name].update(vs_per_slice={"ds": 100 * c["difference"], "ds_ci": [100 * v for v in c["ci95_groups"]],
                                           "dv": 100 * cv["difference"], "dv_ci": [100 * v for v in cv["ci95_groups"]]})
    return res, per_slice, subject


def main(argv=None) -> int:
    from napari_mias_sam.backbones import load_backbone
    from napari_mias_sam.bank import load_bank
    from napari_mias_sam.evaluation.sweep import units_from_volumes
    from napari_mias_sam.pipeline.embedding_cache import EmbeddingCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", type=Path, required=True)
    ap.add_argument("--images", type=Path, nargs="+", required=True)
    ap.add_argument("--gts", type=Path, nargs="+", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--designs", type=Path, help="JSON: {name: {Design fields}}; default: a built-in grid")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--final", action="store_true", help="score only the shipped default (product code) against the baseline")
    ap.add_argument("--per-slice", action="store_true", help="also score the backbone's per-slice prompt on every slice")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    bank = load_bank(a.bank)
    bb = load_backbone(bank.backbone["name"], None, "cpu")
    units = units_from_volumes(a.images, a.gts, bank)
    work = a.work / hashlib.sha256(str(a.bank.resolve()).encode()).hexdigest()[:12]
    work.mkdir(parents=True, exist_ok=True)
    cal, ref, _img = cached_maps(units, bank, bb, EmbeddingCache(), work)
    if any(u.embeddings is None for u in units):
        from napari_mias_sam.evaluation.sweep import encode_units

        encode_units(units, bb, EmbeddingCache(), None, 4)
    entry = bank.manifest["calibration"]["per_k"]["1"]
    dec = Decoder(bb, units, work)
    designs = {} if a.final else {"previous default (core box, mask 1)": Design(prompt="core", pad=R.CORE_PAD)}
    if a.designs:
        designs.update({k: Design(**v) for k, v in json.loads(a.designs.read_text()).items()})
    preds: dict[str, list[np.ndarray]] = {"baseline": ref}  # thresholded at 0.5 on the slice grid, as evaluate does
    extra = {}
    for name, d in designs.items():
        stats: dict = {}
        outs, nd = [], 0
        for ui, u in enumerate(units):
            o, n = predict(dec, ui, u, cal[ui], entry, d, stats)
            outs.append(o)
            nd += n
        preds[name] = outs
        extra[name] = {"outcomes": {str(k): v for k, v in sorted(stats.items())}, "prompts_per_volume": nd / len(units)}
        dec.save()
    stats, outs, nd = {}, [], 0
    for ui, u in enumerate(units):  # the shipped default, run by the product's code (not the replica above)
        o, n = product_predict(bb, u, cal[ui], entry, stats)
        outs.append(o)
        nd += n
    preds["shipped default (product code: decode_all, regions)"] = outs
    extra["shipped default (product code: decode_all, regions)"] = {"outcomes": {str(k): v for k, v in sorted(stats.items())},
                                                                     "prompts_per_volume": nd / len(units)}
    if a.per_slice:
        name = "per-slice prompt on every slice (the small-bank default before)"
        preds[name] = [per_slice_predict(bb, u, cal[ui]) for ui, u in enumerate(units)]
        extra[name] = {"outcomes": {}, "prompts_per_volume": float(np.mean([u.foreground.sum() for u in units]))}
    res, _, _ = score(units, preds)
    print(f"| design | slice | d slice [95%] | volume | d volume [95%] | fp | outcomes (0 = region) |")
    for name, r in res.items():
        if name == "baseline":
            print(f"| baseline | {r['slice']:.2f} | | {r['volume']:.2f} | | {r['fp']} | |")
            continue
        print(f"| {name} | {r['slice']:.2f} | {r['ds']:+.2f} [{r['ds_ci'][0]:+.2f}, {r['ds_ci'][1]:+.2f}] | {r['volume']:.2f} | "
              f"{r['dv']:+.2f} [{r['dv_ci'][0]:+.2f}, {r['dv_ci'][1]:+.2f}] | {r['fp']} | {extra[name]['outcomes']} |", flush=True)
        if "vs_per_slice" in r:
            v = r["vs_per_slice"]
            print(f"|   vs the per-slice prompt | | {v['ds']:+.2f} [{v['ds_ci'][0]:+.2f}, {v['ds_ci'][1]:+.2f}] | | "
                  f"{v['dv']:+.2f} [{v['dv_ci'][0]:+.2f}, {v['dv_ci'][1]:+.2f}] | | |", flush=True)
    print(f"{len(units)} volumes, {time.perf_counter() - t0:.0f} s")
    if a.json:
        for k in extra:
            res[k].update(extra[k])
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
