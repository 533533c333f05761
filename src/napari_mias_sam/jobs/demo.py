"""The main job on a fresh machine: build a bank from the bundled normal volumes, segment the
bundled test case with the bundled LiteMedSAM backbone on the CPU, and score it against its
ground truth (MIAS-SAM and the paper's 0.5-threshold baseline)."""

from __future__ import annotations

import time
from pathlib import Path

from ..core import defaults
from ..core.progress import ProgressFn
from ..method.anomaly import normalise_maps
from ..backbones import load_backbone
from ..core.errors import InputError
from ..evaluation.scoring import cog_hits, threshold_baseline_masks
from ..data.volumes import load_labels, load_volume
from ..evaluation.metrics import slice_dice, volume_dice
from ..pipeline.segment import segment_volume
from ..method.preprocess import PREPROCESS_PRESETS
from ..pipeline.settings import SegmentSettings
from .bank_builds import build_bank_from_files
from .outputs import write_outputs
from ..core.paths import sample_data_dir

__all__ = ["DEMO_MARKER", "sample_files", "run_demo"]

DEMO_MARKER = ".mias-sam-demo"


def sample_files(folder: Path | None = None) -> dict:
    """The bundled sample: normal volumes for the bank, the test case and its ground truth."""
    folder = folder or sample_data_dir()
    normals = sorted(folder.glob("normal_*.nii.gz"))
    case = folder / "case_01.nii.gz"
    gt = folder / "case_01_seg.nii.gz"
    if not normals or not case.is_file() or not gt.is_file():
        raise InputError(f"{folder}: the sample data is incomplete (normal_*.nii.gz, case_01.nii.gz, case_01_seg.nii.gz).")
    return {"normals": normals, "case": case, "gt": gt}


def prepare_out_dir(out: Path) -> None:
    """Use ``out`` for demo outputs: new, empty, or an earlier demo's folder (never anything else)."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder; choose another --out.")
        if any(out.iterdir()) and not (out / DEMO_MARKER).exists():
            raise InputError(f"{out}: folder is not empty and was not made by 'mias-sam demo'; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by mias-sam demo; safe to delete\n")


def run_demo(out: Path, *, device: str = "cpu", batch_size: int = defaults.BATCH_SIZE, progress: ProgressFn | None = None) -> dict:
    """Run the demo and return its report (timings in seconds, Dice, output paths)."""
    files = sample_files()
    prepare_out_dir(out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    backbone = load_backbone("litemedsam", device=device)
    timings["load_backbone"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bank = build_bank_from_files(files["normals"], backbone, preprocessing=PREPROCESS_PRESETS["mri"], batch_size=batch_size, progress=progress)
    bank.save(out / "bank", overwrite=True)
    timings["build_bank"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vol = load_volume(files["case"])
    gt = load_labels(files["gt"], like=vol)
    timings["load_volume"] = time.perf_counter() - t0

    result = segment_volume(vol, bank, backbone, SegmentSettings(), batch_size=batch_size, progress=progress)
    timings.update({f"segment_{k[:-2]}": v for k, v in result.timings.items()})
    t0 = time.perf_counter()
    paths = write_outputs(result, out, overwrite=True)
    timings["write_outputs"] = time.perf_counter() - t0

    gt_bin = gt.data > 0
    pred = result.mask_volume() > 0
    sd = slice_dice(pred, gt_bin, axis=result.axis)
    ref_maps = normalise_maps(result.raw_maps, "reference", valid=result.encoded.foreground)
    base = threshold_baseline_masks(ref_maps, result.encoded.foreground, result.encoded.frame, result.axis)
    sd_base = slice_dice(base, gt_bin, axis=result.axis)
    hits, n_lesion = cog_hits(result, gt_bin)
    return {
        "sample": {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in files.items()},
        "bank": {"path": str(out / "bank"), "patches": bank.ntotal, "slices": bank.manifest["counts"]["slices"]},
        "settings": result.metadata()["settings"],
        "per_slice_dice": {int(k): round(float(v), 4) for k, v in sd["per_slice"].items()},
        "slice_dice": sd["mean"],
        "volume_dice": volume_dice(pred, gt_bin),
        "baseline_threshold_0.5_slice_dice": sd_base["mean"],
        "baseline_threshold_0.5_volume_dice": volume_dice(base, gt_bin),
        "cog_inside_lesion": {"hits": hits, "lesion_slices": n_lesion},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "total_s": round(sum(timings.values()), 1),
        "outputs": {k: str(v) for k, v in paths.items()},
        "out_dir": str(out),
    }
