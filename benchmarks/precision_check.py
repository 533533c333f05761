"""Effect of reduced-precision (bf16 / fp16 autocast) encoding on embeddings, maps and masks.

The GPU path can encode in bf16/fp16 (``--precision``); this script measures what that changes,
against fp32, on the bundled sample. Run from the repository root::

    python benchmarks/precision_check.py                 # fp32 then bf16, on the CPU
    python benchmarks/precision_check.py --device cuda fp32 bf16 fp16

Steps per precision: a bank from ``normal_01`` (14 slices) and slices 5-12 of ``case_01`` (its
lesion is on 6-11), both encoded at that precision with eager LiteMedSAM (no ONNX path: it is fp32
only), default settings. Printed per precision: slice and volume Dice against the ground truth and,
against fp32, the embeddings' largest and relative L2 difference, the largest anomaly-map
difference and the Dice between the masks. On a CPU bf16 is emulated: slow (about a minute per
slice on 2 cores), a measurement of numerics only. ``docs/performance.md`` holds the results.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np


def crop_slices(src: Path, dst: Path, start: int, stop: int) -> Path:
    """Slices ``start:stop`` of voxel axis 2, with the affine moved so the world stays true."""
    img = nib.load(str(src))
    shift = np.eye(4)
    shift[2, 3] = start
    out = nib.Nifti1Image(np.asarray(img.dataobj)[:, :, start:stop], img.affine @ shift, header=img.header.copy())
    nib.save(out, str(dst))
    return dst


def main(argv: list[str] | None = None) -> int:
    from napari_mias_sam.core.paths import sample_data_dir
    from napari_mias_sam.backbones.litemedsam import LiteMedSAM
    from napari_mias_sam.bank import build_bank
    from napari_mias_sam.evaluation.scoring import gt_metrics
    from napari_mias_sam.data.volumes import load_labels, load_volume
    from napari_mias_sam.evaluation.metrics import dice
    from napari_mias_sam.pipeline.segment import encode_volume, segment_volume
    from napari_mias_sam.bank.store import preprocessing_from_bank
    from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
    from napari_mias_sam.core.records import to_dict
    from napari_mias_sam.pipeline.frames import volume_groups

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("precisions", nargs="*", default=["fp32", "bf16"], help="fp32 (first: the reference), bf16, fp16")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if args.precisions[0] != "fp32":
        parser.error("the first precision must be fp32 (the reference)")
    warnings.simplefilter("ignore")
    sample = sample_data_dir()
    prep = PREPROCESS_PRESETS["mri"]
    with tempfile.TemporaryDirectory() as tmp:
        case = crop_slices(sample / "case_01.nii.gz", Path(tmp) / "case.nii.gz", 5, 13)
        seg = crop_slices(sample / "case_01_seg.nii.gz", Path(tmp) / "seg.nii.gz", 5, 13)
        vol = load_volume(case)
        gt = load_labels(seg, like=vol).data > 0
        ref = None
        for prec in args.precisions:
            bb = LiteMedSAM(device=args.device, fast="off", precision=prec)
            t0 = time.time()
            bank = build_bank(volume_groups([sample / "normal_01.nii.gz"], prep), bb, layout="paper1024",
                              preprocessing=to_dict(prep))
            res = segment_volume(vol, bank, bb, encoded=encode_volume(vol, bb, preprocessing_from_bank(bank), axis=2))
            m = gt_metrics(res, gt)
            row = {"slice_dice": m["slice_dice"], "volume_dice": m["volume_dice"], "seconds": round(time.time() - t0, 1)}
            if ref is None:
                ref = (res, row)
            else:
                a, a_row = ref
                e32, e = a.encoded.embeddings.float(), res.encoded.embeddings.float()
                row.update(emb_max_abs=float((e - e32).abs().max()), emb_rel_l2=float((e - e32).norm() / e32.norm()),
                           map_max_abs=float(np.abs(res.maps - a.maps).max()),
                           mask_dice_vs_fp32=dice(res.mask_volume() > 0, a.mask_volume() > 0),
                           slice_dice_points_vs_fp32=round(100 * (row["slice_dice"] - a_row["slice_dice"]), 2))
            print(prec, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
