"""The review of one live session as a QA table (:mod:`napari_mias_sam.data.qa_table`), and a saved QA
table applied back to a session of the same volume. No Qt: the widget, the writer and the tests
call it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ...evaluation.metrics import dice, volume_dice
from ...core.errors import InputError
from ...jobs.outputs import output_paths, write_outputs
from ...pipeline.lesion_set import result_lesions
from ...core.atomic_outputs import OutputSet
from ...data.qa_table import (
    ACCEPTED,
    CORRECTED,
    PENDING,
    QA_SUFFIX,
    REJECTED,
    QaTable,
    check_same_volume,
    qa_csv_text,
    qa_name,
    read_qa,
)
from .layers import WORLD_AXIS_LABELS, display_axes, layer_affine, read_nifti_layers
from ...core.records import to_dict
from .live import LiveSession

__all__ = ["qa_rows", "volume_fields", "apply_table", "in_mask", "save_results", "results_names", "STATUS_COLORS",
           "QA_LAYER_KEY", "QA_KEY", "qa_points_layer", "results_folder_layers"]

#: Point colours by review status (pending: the computed prompt's red).
STATUS_COLORS = {PENDING: "red", ACCEPTED: "lime", CORRECTED: "orange", REJECTED: "gray", "": "red"}
QA_LAYER_KEY = "mias_sam_qa"  # metadata of a CoG layer read from a QA file: {"path", "volume", "shape"}
QA_KEY = "qa_rows"  # the CoG layer's metadata["mias_sam"] entry holding the QA table (what the writer saves)


def volume_fields(session: LiveSession) -> dict:
    """The columns that repeat on every row: volume name and shape, backbone, settings (JSON)."""
    r = session.result
    return {"volume": r.volume.name, "volume_shape": "x".join(str(n) for n in r.volume.shape),
            "affine": json.dumps([round(float(v), 6) for v in np.asarray(r.volume.affine, dtype=float).ravel()]),
            "backbone": str((r.backbone_info or {}).get("name", "")),
            "settings": json.dumps(to_dict(session.settings), sort_keys=True, separators=(",", ":"))}


def in_mask(mask: np.ndarray, ijk) -> bool | None:
    """Whether the voxel nearest to ``ijk`` (file indices) is set in ``mask`` (None without a point)."""
    if ijk is None:
        return None
    idx = tuple(int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip(ijk, mask.shape))
    return bool(mask[idx])


def qa_rows(session: LiveSession, gt: np.ndarray | None = None) -> list[dict]:
    """One QA row per slice (:data:`~napari_mias_sam.data.qa_table.QA_COLUMNS`). ``gt``: the lesion
    mask in file voxel order (bool), or None (the ground-truth columns stay empty)."""
    r = session.result
    ax = r.axis
    spacing = np.asarray(r.volume.spacing, dtype=float)
    with session.lock:
        base = r.points_rows()  # the <stem>_points.csv columns, as the CLI writes them
        method = {s: session.method_slice(s, with_mask=gt is not None) for s in range(r.n_slices)}
        after = session.mask_volume() != 0 if gt is not None else None  # rejected lesions left out
    common = volume_fields(session)
    if gt is not None and after is not None:
        before = np.moveaxis(after.copy(), ax, 0)
        for s, (_, m) in method.items():
            before[s] = m
        before = np.moveaxis(before, 0, ax)
        gt = np.asarray(gt) != 0
        if gt.shape != after.shape:
            raise ValueError(f"ground truth {gt.shape} and mask {after.shape} differ in shape")
        common.update(volume_dice_before=volume_dice(before, gt), volume_dice_after=volume_dice(after, gt))
    rows = []
    for s, row in enumerate(base):
        status = session.status(s)
        orig = method[s][0]
        cur = r.cog_voxel(s)
        row = dict(row, status=status, **common)
        if orig is not None:
            row.update(orig_i=round(orig[0], 2), orig_j=round(orig[1], 2), orig_k=round(orig[2], 2))
        if orig is not None and cur is not None:
            row["displacement_mm"] = float(np.linalg.norm((np.asarray(cur) - np.asarray(orig)) * spacing))
        if gt is not None:
            g = np.take(gt, s, axis=ax)
            row.update(has_lesion=bool(g.any()), in_lesion_before=in_mask(gt, orig),
                       in_lesion_after=None if cur is None else (status != REJECTED and bool(in_mask(gt, cur))),
                       slice_dice_before=dice(np.take(before, s, axis=ax), g, empty_value=float("nan")),
                       slice_dice_after=dice(np.take(after, s, axis=ax), g, empty_value=float("nan")))
        rows.append(row)
    return rows


def apply_table(session: LiveSession, table: QaTable) -> list[int]:
    """Give ``session`` the review saved in ``table`` (same volume, refused otherwise): corrected
    points moved to their saved place, every status set. Returns the slices that became stale."""
    r = session.result
    check_same_volume(table, r.volume.name, r.volume.shape, r.n_slices)
    stale: set[int] = set()
    for row in table.rows:
        s, st = row["slice"], row["status"]
        if not st or st == PENDING or r.prompts[s] is None:
            continue
        moved = (row["displacement_mm"] or 0.0) > 1e-3
        if (st == CORRECTED or moved) and None not in (row["i"], row["j"], row["k"]):
            session.move_point(s, session.file_to_display((row["i"], row["j"], row["k"])))
            stale.add(s)
        if st in (ACCEPTED, REJECTED):
            stale.update(session.review(s, "accept" if st == ACCEPTED else "reject"))
    return sorted(stale | session.stale)


def results_names(stem: str) -> list[str]:
    """The files of a saved review: the CLI's five outputs and ``<stem>_qa.csv``."""
    return [p.name for p in output_paths(".", stem).values()] + [qa_name(stem)]


def save_results(session: LiveSession, rows: list[dict], folder: str | os.PathLike, *, lesions=None) -> dict[str, Path]:
    """Write the reviewed mask, the anomaly map, ``<stem>_points.csv``, the lesions
    (``<stem>_lesions.nii.gz`` and ``.csv``, as the CLI does) and ``<stem>_qa.csv`` into ``folder``,
    all or none. ``lesions``: the dock's reviewed :class:`~napari_mias_sam.pipeline.lesion_set.LesionSet`
    (default: the shown mask's lesions; rejected lesions are in neither). Saving again replaces
    the files of the same volume's review; any other existing file of those names is refused (one
    line), and an input is never overwritten."""
    r = session.result
    stem = r.volume.name
    folder = Path(folder)
    names = results_names(stem)
    existing = [n for n in names if (folder / n).exists()]
    overwrite = False
    if existing:
        if qa_name(stem) not in existing:
            raise InputError(f"{folder / existing[0]}: already exists and is not from a review of '{stem}' (no {qa_name(stem)} "
                             "beside it); choose another results folder.")
        check_same_volume(read_qa(folder / qa_name(stem)), stem, r.volume.shape, r.n_slices)
        overwrite = True  # the same volume's review, saved again
    inputs = [r.volume.path] if r.volume.path else []
    with OutputSet(folder, names, overwrite=overwrite, inputs=inputs, lock_name=stem, what="results folder") as outs:
        outs.temp(qa_name(stem)).write_text(qa_csv_text(rows), encoding="utf-8")
        if lesions is None:
            lesions = result_lesions(r, mask=session.mask_volume())
        paths = write_outputs(r, folder, stem=stem, overwrite=overwrite, claim=outs, lesions=lesions)
    paths["qa"] = folder / qa_name(stem)
    return paths


# -- opening a saved review ----------------------------------------------------------------------
def qa_points_layer(path: str | os.PathLike) -> tuple:
    """A ``<stem>_qa.csv`` as a napari Points ``LayerDataTuple``: one point per prompted slice where
    its saved prompt centre is (placed by the saved affine, over the volume's other layers), the QA
    columns as features, coloured by status. Running MIAS-SAM on that volume then applies the review."""
    table = read_qa(path)
    if table.affine is None:
        raise InputError(f"{path}: the QA file has no affine; save it again from the viewer.")
    axes = display_axes(table.affine)
    rows = [r for r in table.rows if r["status"] and None not in (r["i"], r["j"], r["k"])]
    coords = np.asarray([[(r["i"], r["j"], r["k"])[a] for a in axes] for r in rows], dtype=float).reshape(-1, 3)
    feats = {c: [np.nan if r[c] is None else r[c] for r in rows] for c in
             ("slice", "image_score", "predicted_iou", "orig_i", "orig_j", "orig_k", "displacement_mm",
              "slice_dice_before", "slice_dice_after")}
    feats["status"] = [r["status"] for r in rows]
    feats["moved"] = [(r["displacement_mm"] or 0.0) > 1e-3 for r in rows]
    for c in ("in_lesion_before", "in_lesion_after"):
        feats[c] = [np.nan if r[c] is None else float(r[c]) for r in rows]
    meta = {QA_LAYER_KEY: {"path": str(Path(path).resolve()), "volume": table.volume, "shape": list(table.shape)},
            "affine": table.affine, "display_axes": axes, "source_shape": table.shape}
    kwargs = {"name": f"{table.volume} CoG (review)", "affine": layer_affine(table.affine, axes), "features": feats,
              "face_color": [STATUS_COLORS.get(st, "red") for st in feats["status"]] or "red", "border_color": "white",
              "size": max(3.0, 0.04 * max(table.shape)),
              "metadata": meta, "axis_labels": WORLD_AXIS_LABELS}
    return (coords, kwargs, "points")


def results_folder_layers(folder: str | os.PathLike) -> list[tuple]:
    """A folder saved by 'Save results': each volume's mask (Labels), anomaly map (Image) and
    reviewed prompts (Points, from its ``<stem>_qa.csv``)."""
    out: list[tuple] = []
    for qa in sorted(Path(folder).glob(f"*{QA_SUFFIX}")):
        stem = qa.name[: -len(QA_SUFFIX)]
        paths = output_paths(folder, stem)
        if paths["anomaly"].is_file():
            data, kw, _ = read_nifti_layers(paths["anomaly"], kind="image")[0]
            kw.update(name=f"{stem} anomaly", colormap="inferno", blending="additive", opacity=0.8)
            out.append((data, kw, "image"))
        if paths["mask"].is_file():
            data, kw, _ = read_nifti_layers(paths["mask"], kind="labels")[0]
            kw.update(name=f"{stem} mask", opacity=0.5)
            out.append((data, kw, "labels"))
        out.append(qa_points_layer(qa))
    return out
