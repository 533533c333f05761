"""``mias-sam segment`` on PNG slices (files or folders), as BMAD users work.

The slices of one call are segmented together, like the slices of one volume: ``reference``
normalisation spans them (as the paper's code spans its test set), ``calibrated`` uses the
bank's normal data. Outputs per slice: ``<stem>_mask.png`` (0/255) and ``<stem>_anomaly.npy``
(float32, the slice's pixel grid); per call: one prompts CSV. Everything is checked before any
work and written atomically, all files together.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import os
from pathlib import Path

import numpy as np

from ..core import defaults
from ..bank import MemoryBank
from ..pipeline.embedding_cache import EmbeddingCache
from ..core.errors import BankMismatchError, InputError
from ..data.volumes import Volume, atomic_path, is_nifti, read_png_files
from ..core.progress import CancelFn, ProgressFn
from ..pipeline.segment import EncodedVolume, SegmentationResult, cached_encode, setup_run
from ..method.preprocess import Frame, foreground_slices, from_frame, to_frame
from ..method.reference_encoding import encoding_of
from ..pipeline.settings import SegmentSettings
from .outputs import check_outputs

__all__ = ["PROMPTS_CSV", "png_inputs", "check_png_out_dir", "check_png_bank", "read_png_call", "png_output_paths",
           "png_volume", "encode_png_stack", "segment_pngs", "prompt_rows", "write_png_outputs"]

#: The one prompts table a PNG call writes into its output folder.
PROMPTS_CSV = "prompts.csv"


def _is_png(p: Path) -> bool:
    return p.suffix.lower() == ".png"


def png_inputs(inputs: list[str | os.PathLike]) -> list[Path] | None:
    """The PNG slices named by ``inputs`` (PNG files, or folders holding PNGs), sorted within each
    folder; ``None`` when the inputs are not PNGs (NIfTI volumes). Mixing the two is an error."""
    paths = [Path(p) for p in inputs]
    pngs: list[Path] = []
    other: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and _is_png(q))
            if found:
                pngs.extend(found)
            else:
                other.append(p)
        elif _is_png(p):
            if not p.is_file():
                raise InputError(f"{p}: no such PNG file.")
            pngs.append(p)
        else:
            other.append(p)
    if not pngs:
        return None
    if other:
        kind = "NIfTI volume" if is_nifti(other[0]) else "input that is not a PNG slice"
        raise InputError(f"{other[0]}: a {kind} among PNG slices; segment PNG slices and volumes in separate calls.")
    stems: dict[str, Path] = {}
    for p in pngs:
        if p.stem in stems and stems[p.stem] != p:
            raise InputError(f"{p} and {stems[p.stem]} share the name '{p.stem}': their outputs would collide; "
                             "segment them in separate calls (different --out folders).")
        stems[p.stem] = p
    if len(stems) != len(pngs):
        raise InputError("a PNG slice is named twice in the inputs; name each slice once.")
    return pngs


def check_png_out_dir(out_dir: str | os.PathLike, inputs: list[str | os.PathLike]) -> None:
    """Refuse an output folder that is an input folder: the mask PNGs written there would be read
    as slices by the next call on that folder."""
    out = Path(out_dir).resolve()
    folders = {Path(p).resolve() for p in inputs if Path(p).is_dir()} | {Path(p).resolve().parent for p in inputs if not Path(p).is_dir()}
    if out in folders:
        raise InputError(f"{out_dir}: is a folder of input slices; the mask PNGs written there would be read as slices "
                         "next time. Choose another --out folder.")


def read_png_call(paths: list[Path]) -> np.ndarray:
    """(N, H, W) float32 grey levels in [0, 1]; every slice of a call must have the same size."""
    arrays = read_png_files(paths)
    first = arrays[0].shape
    for p, a in zip(paths, arrays):
        if a.shape != first:
            raise InputError(
                f"{p}: is {a.shape[1]}x{a.shape[0]} pixels but {paths[0]} is {first[1]}x{first[0]}; the slices of one call "
                "share one size (reference normalisation spans them): segment each size in its own call."
            )
    return np.stack(arrays).astype(np.float32)


def png_output_paths(out_dir: str | os.PathLike, pngs: list[Path]) -> dict[str, Path]:
    """Every file a call writes: ``<stem>_mask.png`` and ``<stem>_anomaly.npy`` per slice, and the prompts CSV."""
    out = Path(out_dir)
    paths = {PROMPTS_CSV: out / PROMPTS_CSV}
    for p in pngs:
        paths[f"{p.stem}/mask"] = out / f"{p.stem}_mask.png"
        paths[f"{p.stem}/anomaly"] = out / f"{p.stem}_anomaly.npy"
    return paths


def check_png_bank(bank: MemoryBank) -> None:
    """Refuse a bank built from NIfTI volumes: PNG grey levels are not its intensities."""
    mode = bank.preprocessing.get("mode")
    if mode != "png":
        raise BankMismatchError(
            f"{bank.path or 'the memory bank'} was built from NIfTI volumes ('{mode}' preprocessing); PNG slices need a bank "
            "built from normal PNG slices (e.g. mias-sam build-bank BMAD/Brain_MRI --out banks/bmad-brain)."
        )


def segment_pngs(
    pngs: list[Path],
    bank: MemoryBank,
    backbone,
    settings: SegmentSettings | None = None,
    *,
    cache: EmbeddingCache | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> SegmentationResult:
    """Segment the PNG slices of one call together (a stack of slices along axis 0)."""
    check_png_bank(bank)
    setup = setup_run(bank, backbone, settings, slice_set=True)
    volume = png_volume(pngs)
    encoded = encode_png_stack(volume.data, backbone, cache, batch_size=batch_size, progress=progress, cancelled=cancelled)
    return setup.segment(volume, axis=0, encoded=encoded, progress=progress, cancelled=cancelled)


def png_volume(pngs: list[Path]) -> Volume:
    """The PNG slices of one call as one stack (N, H, W) in [0, 1] (sizes checked by :func:`read_png_call`)."""
    return Volume(data=read_png_call(pngs), affine=np.eye(4), path=None, meta={"png_slices": [str(p) for p in pngs]})


def encode_png_stack(
    stack: np.ndarray,
    backbone,
    cache: EmbeddingCache | None = None,
    *,
    batch_size: int = defaults.BATCH_SIZE,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> EncodedVolume:
    """A PNG stack in the model frame (its grey levels as they are: no intensity preprocessing) and
    its embeddings (from ``cache`` when it holds them)."""
    n, h, w = stack.shape
    frames = to_frame(stack, encoding=encoding_of(backbone))
    emb, key, hit = cached_encode(frames, backbone, cache, batch_size=batch_size, progress=progress, cancelled=cancelled)
    return EncodedVolume(embeddings=emb, frames=frames, foreground=foreground_slices(stack), axis=0,
                         frame=Frame(h, w), key=key, from_cache=hit)


def prompt_rows(result: SegmentationResult, pngs: list[Path]) -> list[dict]:
    """One row per slice: file, prompt centre (x = column, y = row, the PNG's pixels), prompt type,
    image score, the chosen mask's predicted IoU, whether the slice was kept."""
    rows = []
    for s, (p, vox) in enumerate(zip(pngs, result.points_rows())):
        centre = result.cog_voxel(s)  # (slice, row, column)
        rows.append({
            "file": p.name,
            "x": "" if centre is None else round(centre[2], 3),
            "y": "" if centre is None else round(centre[1], 3),
            "prompt": "none" if result.prompts[s] is None else result.settings.prompt,
            "image_score": vox["image_score"],
            "predicted_iou": vox["predicted_iou"],
            "anomalous": vox["anomalous"],
        })
    return rows


def write_png_outputs(result: SegmentationResult, pngs: list[Path], out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Path]:
    """Write every slice's mask PNG (0/255) and anomaly map (.npy, float32) and the prompts CSV,
    all through temporary files renamed into place together (a failure keeps earlier files)."""
    from PIL import Image

    paths = png_output_paths(out_dir, pngs)
    check_outputs(paths, pngs, overwrite=overwrite)
    rows = prompt_rows(result, pngs)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    frame = result.encoded.frame
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_path(p)) for k, p in paths.items()}
        for s, p in enumerate(pngs):
            Image.fromarray(result.slice_mask(s).astype(np.uint8) * 255).save(tmp[f"{p.stem}/mask"], format="PNG")
            amap = from_frame(result.maps[s : s + 1], frame)[0].astype(np.float32)
            with open(tmp[f"{p.stem}/anomaly"], "wb") as fh:
                np.save(fh, amap, allow_pickle=False)
        tmp[PROMPTS_CSV].write_text(buf.getvalue(), encoding="utf-8")
    return paths
