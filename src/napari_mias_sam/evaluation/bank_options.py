"""``mias-sam benchmark --accuracy``: the Dice cost of each bank option (index type, nprobe,
coreset ratio) against the exact flat bank, on a data folder with ground truth."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..core import defaults
from ..core.machine import machine_info
from ..core.progress import ProgressFn

__all__ = ["accuracy_files", "bank_accuracy"]



def accuracy_files(folder: Path) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """Normal volumes and (image, ground truth) pairs of a data folder: the benchmark's layout
    (``train/*.nii.gz``, ``test/images/X``, ``test/labels/X``) or the bundled sample's
    (``normal_*.nii.gz``, ``case_*.nii.gz`` with ``case_*_seg.nii.gz``)."""
    from ..core.errors import InputError

    folder = Path(folder)
    if (folder / "train").is_dir() and (folder / "test" / "images").is_dir():
        normals = sorted((folder / "train").glob("*.nii*"))
        images = sorted((folder / "test" / "images").glob("*.nii*"))
        cases = [(i, folder / "test" / "labels" / i.name) for i in images]
        missing = [str(g) for _, g in cases if not g.is_file()]
        if missing:
            raise InputError(f"{folder}: test images without a ground truth in test/labels/: {', '.join(missing[:3])}")
    else:
        normals = sorted(folder.glob("normal_*.nii.gz"))
        cases = [(c, c.with_name(c.name.replace(".nii.gz", "_seg.nii.gz"))) for c in sorted(folder.glob("case_*.nii.gz"))
                 if not c.name.endswith("_seg.nii.gz")]
        cases = [c for c in cases if c[1].is_file()]
    if not normals or not cases:
        raise InputError(f"{folder}: needs normal volumes and test cases with ground truth "
                         "(train/ + test/images/ + test/labels/, or normal_*.nii.gz + case_*.nii.gz + case_*_seg.nii.gz)")
    return normals, cases


def bank_accuracy(
    normals: list[Path],
    cases: list[tuple[Path, Path]],
    *,
    options: tuple[dict, ...] | None = None,
    backbone=None,
    layout: str = defaults.PATCH_LAYOUT,
    cache=None,
    progress: ProgressFn | None = None,
) -> dict:
    """Segment ``cases`` (image, ground truth) with banks built from ``normals`` using each bank
    option (index type, nprobe, coreset ratio) and compare with the exact flat bank: slice and
    volume Dice against the ground truth, Dice between the option's masks and the exact bank's,
    the largest anomaly-map difference, and the recall of the exact nearest neighbour (k=1).

    Every volume is encoded once (the options share the embeddings); with ``cache`` (an
    :class:`~napari_mias_sam.pipeline.embedding_cache.EmbeddingCache`) embeddings also come from and go to it.
    """
    from ..backbones import load_backbone
    from ..bank import build_bank, INDEX_TYPES
    from .scoring import gt_metrics
    from ..data.volumes import load_labels, load_volume
    from .metrics import dice
    from ..pipeline.segment import encode_volume, segment_volume
    from ..bank.store import preprocessing_from_bank
    from ..method.preprocess import PREPROCESS_PRESETS
    from ..core.records import to_dict
    from ..pipeline.frames import volume_groups


    options = options or (
        *({"index_type": t} for t in INDEX_TYPES),
        {"index_type": "flat", "coreset_ratio": 0.25},
        {"index_type": "flat", "coreset_ratio": 0.1},
        {"index_type": "flat", "coreset_ratio": 0.01},
    )
    bb = backbone or load_backbone("litemedsam", device="cpu")
    prep = PREPROCESS_PRESETS["mri"]
    memo: dict[bytes, torch.Tensor] = {}

    encode = bb.encode
    if cache is not None:
        from ..pipeline.embedding_cache import cached_encoder

        encode = cached_encoder(bb, cache)

    def embed(frames: torch.Tensor) -> torch.Tensor:  # encode each distinct batch once across options
        key = frames.numpy().tobytes()
        if key not in memo:
            memo[key] = encode(frames)
        return memo[key]

    vols = [(load_volume(i), load_labels(g, like=load_volume(i)).data > 0, Path(i).name) for i, g in cases]
    encoded = None
    results: list[dict] = []
    exact: dict[str, object] = {}
    for oi, opt in enumerate(options):
        if progress:
            progress("bank options", oi, len(options))
        t0 = time.perf_counter()
        bank = build_bank(volume_groups([Path(p) for p in normals], prep), bb, layout=layout, preprocessing=to_dict(prep),
                          embed=embed, **opt)
        build_s = time.perf_counter() - t0
        if encoded is None:
            encoded = [encode_volume(v, bb, preprocessing_from_bank(bank), axis=2, cache=cache) for v, _, _ in vols]
        row = {"option": dict(opt), "patches": bank.ntotal, "nprobe": bank.nprobe, "build_s": round(build_s, 2), "cases": {}}
        for (v, gt, name), enc in zip(vols, encoded):
            res = segment_volume(v, bank, bb, encoded=enc)
            m = gt_metrics(res, gt)
            c = {"slice_dice": m["slice_dice"], "volume_dice": m["volume_dice"], "per_slice_dice": list(m["per_slice_dice"].values())}
            if oi == 0:
                exact[name] = res
            else:
                ref = exact[name]
                c["mask_dice_vs_exact"] = dice(res.mask_volume() > 0, ref.mask_volume() > 0)  # type: ignore[attr-defined]
                c["max_map_diff_vs_exact"] = float(np.abs(res.maps - ref.maps).max())  # type: ignore[attr-defined]
                c["nn_recall_vs_exact"] = float(np.mean(np.isclose(res.scores, ref.scores, rtol=1e-4, atol=1e-6)))  # type: ignore[attr-defined]
            row["cases"][name] = c
        # the paper's slice Dice over the whole test set: the mean over every anomalous slice
        pooled = [v for c in row["cases"].values() for v in c.pop("per_slice_dice")]
        row["mean_slice_dice"] = float(np.mean(pooled)) if pooled else float("nan")
        row["mean_volume_dice"] = float(np.mean([c["volume_dice"] for c in row["cases"].values()]))
        results.append(row)
    base = results[0]["mean_slice_dice"]
    for r in results:
        r["dice_points_vs_exact"] = round(100 * (r["mean_slice_dice"] - base), 2)
    return {"machine": machine_info(), "normals": [str(p) for p in normals], "cases": [str(c[0]) for c in cases],
            "backbone": bb.describe(), "layout": layout, "results": results}
