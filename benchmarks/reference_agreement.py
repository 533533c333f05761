"""Check the paper mode against the reference pipeline on PNG slices (BMAD, or the bundled sample).

The product runs as the paper does (``reference`` encoding, the bank's layout, k 1, reference
normalisation over the given slices, CoG point, gamma 5, mask 3); the reference side is
segment-anything's own ``SamPredictor`` used as the paper's code uses it: ``set_image`` on the
uint8 3-channel slice, ``predict`` with the same centre-of-gravity point, multimask output, third
mask. Printed per slice: the embeddings' max absolute and max relative difference (max |diff| /
max |reference|), and the third mask's Dice with the reference's; ``--standard-too`` also runs
the standard encoding, to show what the reference encoding changes.

On BMAD, with the real weights (the bank must be built with ``--encoding reference``)::

    mias-sam build-bank BMAD/Brain_MRI --out banks/bmad-brain-ref --backbone sam-vit_b \\
        --checkpoint sam_vit_b_01ec64.pth --encoding reference
    python benchmarks/reference_agreement.py BMAD/Brain_MRI/test/Ungood/img --limit 20 \\
        --bank banks/bmad-brain-ref --checkpoint sam_vit_b_01ec64.pth

Without BMAD or the weights (what docs/results.md reports): ``--sample`` writes 256 x 256 uint8 PNG
slices of the bundled sample, a bank from normal slices, and a segment-anything vit_b checkpoint
with random weights drawn from ``--seed``::

    python benchmarks/reference_agreement.py --sample --out /tmp/agreement --standard-too
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from napari_mias_sam.backbones import load_backbone
from napari_mias_sam.bank import load_bank
from napari_mias_sam.evaluation.benchmark import machine_info
from napari_mias_sam.core.errors import MiasSamError
from napari_mias_sam.jobs.png_runs import png_inputs, segment_pngs
from napari_mias_sam.method.preprocess import Preprocessing
from napari_mias_sam.pipeline.settings import SegmentSettings
from napari_mias_sam.jobs.bank_builds import build_bank_from_files

PAPER = SegmentSettings(prompt="cog-point", gamma=5.0, mask_index=3, k=1, normalisation="reference")
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def write_sample(out: Path, seed: int, normals: tuple[int, ...], tests: tuple[int, ...]) -> tuple[Path, Path, list[Path]]:
    """256 x 256 uint8 PNG slices of the bundled sample (bank: normal_01, test: case_01) and a seeded
    random vit_b checkpoint; returns (checkpoint, BMAD-style root, test PNGs)."""
    import nibabel as nib
    from segment_anything import sam_model_registry

    def png(volume: np.ndarray, k: int, path: Path) -> Path:
        s = volume[..., k].astype(np.float64)
        u8 = np.rint((s - s.min()) / max(np.ptp(s), 1e-9) * 255).astype(np.uint8)
        sq = np.zeros((max(u8.shape),) * 2, np.uint8)
        sq[: u8.shape[0], : u8.shape[1]] = u8
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sq).resize((256, 256), Image.BILINEAR).save(path)
        return path

    ckpt = out / f"sam_vit_b_random_seed{seed}.pth"
    if not ckpt.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), ckpt)
    normal = np.asarray(nib.load(str(SAMPLE / "normal_01.nii.gz")).dataobj)
    case = np.asarray(nib.load(str(SAMPLE / "case_01.nii.gz")).dataobj)
    for k in normals:
        png(normal, k, out / "bmad" / "train" / "good" / f"normal01_{k:02d}.png")
    return ckpt, out / "bmad", [png(case, k, out / "test" / f"case01_{k:02d}.png") for k in tests]


def reference_side(ckpt: Path, variant: str, files: list[Path], points: list[tuple[float, float] | None], device: str):
    """segment-anything's SamPredictor on each uint8 RGB slice: (embeddings, third masks)."""
    from segment_anything import SamPredictor, sam_model_registry

    pred = SamPredictor(sam_model_registry[variant](checkpoint=str(ckpt)).to(device).eval())
    embs, masks = [], []
    for f, pt in zip(files, points):
        with Image.open(f) as im:
            pred.set_image(np.asarray(im.convert("L").convert("RGB")))
        embs.append(pred.get_image_embedding()[0].float().cpu())
        if pt is None:
            masks.append(None)
            continue
        m, _, _ = pred.predict(point_coords=np.array([pt]), point_labels=np.array([1]), multimask_output=True)
        masks.append(m[2])
    return embs, masks


def compare(res, ref_embs, ref_masks) -> list[dict]:
    rows = []
    for s, (want, ref_mask) in enumerate(zip(ref_embs, ref_masks)):
        got = res.encoded.embeddings[s].float()
        diff = float((got - want).abs().max())
        row = {"embedding_max_abs_diff": diff, "embedding_max_rel_diff": diff / float(want.abs().max())}
        if ref_mask is not None:
            mine = res.slice_mask(s, 3)
            if mine.shape != ref_mask.shape:  # the reference works in the 256 frame
                mine = res.logits[s, 2].astype(np.float32) > 0
            tot = int(mine.sum() + ref_mask.sum())
            row["mask3_dice"] = 1.0 if tot == 0 else 2.0 * float((mine & ref_mask).sum()) / tot
            row["mask3_pixels"] = int(ref_mask.sum())
        rows.append(row)
    return rows


def without_round_trip(res, bb, ref_embs, ref_masks) -> list[dict]:
    """Mask 3 Dice when the reference-encoded embeddings are decoded but the decoder's 256 x 256
    logits are thresholded as they are (the standard path), instead of going through 1024 first."""
    rows = compare(res, ref_embs, ref_masks)
    bb.encoding = "standard"  # only the logits' way to the frame changes: the embeddings are given
    try:
        for s, (row, ref_mask) in enumerate(zip(rows, ref_masks)):
            if ref_mask is not None:
                mine = bb.decode(res.encoded.embeddings[s], res.prompts[s]).logits[2] > 0
                row["mask3_dice"] = 2.0 * float((mine & ref_mask).sum()) / max(int(mine.sum() + ref_mask.sum()), 1)
    finally:
        bb.encoding = "reference"
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pngs", nargs="*", type=Path, help="PNG slices (files or folders) to compare on")
    ap.add_argument("--bank", type=Path, help="a bank built with --encoding reference (not with --sample)")
    ap.add_argument("--checkpoint", type=Path, help="the SAM checkpoint the bank was built with (not with --sample)")
    ap.add_argument("--limit", type=int, default=None, help="compare on the first N slices only")
    ap.add_argument("--sample", action="store_true", help="PNGs, bank and a random seeded checkpoint from the bundled sample")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the random checkpoint with --sample (default 1234)")
    ap.add_argument("--out", type=Path, default=Path("reference-agreement"), help="folder for --sample's files")
    ap.add_argument("--standard-too", action="store_true", help="also run the standard encoding against the reference")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if a.sample:
            a.out.mkdir(parents=True, exist_ok=True)
            ckpt, bmad, files = write_sample(a.out, a.seed, normals=(7,), tests=(6, 7, 8, 9))
            bank = None
        else:
            if not (a.pngs and a.bank and a.checkpoint):
                ap.error("give PNG slices, --bank and --checkpoint (or --sample)")
            if a.standard_too:
                ap.error("--standard-too needs --sample (it builds a standard bank of the same normal slices)")
            files = png_inputs(a.pngs)
            if files is None:
                raise MiasSamError("no PNG slices among the inputs")
            ckpt, bank = a.checkpoint, load_bank(a.bank)
        files = files[: a.limit] if a.limit else files
        runs = {}
        for encoding in ("reference", "standard") if a.standard_too else ("reference",):
            name = bank.backbone["name"] if bank is not None else "sam-vit_b"
            bb = load_backbone(name, ckpt, a.device, encoding=encoding)
            bk = build_bank_from_files([bmad], bb, preprocessing=Preprocessing(), batch_size=1) if a.sample else bank
            runs[encoding] = segment_pngs(files, bk, bb, PAPER, batch_size=1)  # one slice at a time: ViT-B at 1024 is memory-hungry
            bb_ref = bb if encoding == "reference" else bb_ref
            del bb, bk  # the standard model is not needed again (memory)
            print(f"{encoding}: product done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        res = runs["reference"]
        points = [p.point if p is not None else None for p in res.prompts]
        variant = res.backbone_info["name"].split("-", 1)[1]
        ref_embs, ref_masks = reference_side(ckpt, variant, files, points, a.device)
        report = {"machine": machine_info(), "slices": [f.name for f in files], "seconds": None,
                  "results": {enc: compare(r, ref_embs, ref_masks) for enc, r in runs.items()}}
        report["results"]["reference, masks without the 1024 round trip"] = without_round_trip(res, bb_ref, ref_embs, ref_masks)
    except MiasSamError as exc:
        print(f"reference_agreement: error: {exc}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"Paper mode vs SamPredictor on {len(files)} slices ({m['date_utc']}, {m['cpu']}, {report['seconds']} s)")
    for enc, rows in report["results"].items():
        print(f"  {enc} encoding:")
        for f, r in zip(files, rows):
            print(f"    {f.name:<28} embedding max abs diff {r['embedding_max_abs_diff']:.3g}, max rel "
                  f"{r['embedding_max_rel_diff']:.3g}; mask 3 Dice {r.get('mask3_dice', float('nan')):.4f} "
                  f"({r.get('mask3_pixels', 0)} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
