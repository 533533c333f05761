"""Reviewing prompt placement: the QA table of one volume (``<stem>_qa.csv``), read back with
checks, and the ``mias-sam qa-report`` summary over many volumes. No Qt: the viewer and the CLI
share it.

One row per slice. The first columns are those of the CLI's ``<stem>_points.csv``
(:data:`SHARED_COLUMNS`, same names and meaning: the prompt centre as voxel indices i, j, k after
review); then the review: its ``status`` (:data:`STATUSES`; empty for a slice without a prompt), the
method's own prompt centre (``orig_i/j/k``), how far a correction moved it (``displacement_mm``,
in world millimetres), and, when a ground truth was picked, whether the slice holds lesion,
whether the centre lies inside it before and after review, and the slice's and the volume's Dice
before and after review ("before": the method's prompt on every slice; "after": corrections
decoded, rejected slices cleared). The volume, its shape and affine (voxel -> RAS mm, 16 numbers
row by row), the backbone and the settings repeat on every row so that one file says everything
about its review (and the viewer can place its points without the image).
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..core.errors import InputError

__all__ = [
    "STATUSES",
    "PENDING",
    "ACCEPTED",
    "CORRECTED",
    "REJECTED",
    "SHARED_COLUMNS",
    "QA_COLUMNS",
    "LESION_QA_COLUMNS",
    "QA_SUFFIX",
    "QaTable",
    "qa_name",
    "is_results_folder",
    "qa_csv_text",
    "read_qa",
    "check_same_volume",
    "summarise",
    "report_text",
    "REPORT_NAMES",
]

#: A prompted slice's review status: not reviewed yet; its prompt accepted; its prompt moved by the
#: reviewer; rejected ("no anomaly here": its mask is cleared). Spelled here only.
PENDING, ACCEPTED, CORRECTED, REJECTED = "pending", "accepted", "corrected", "rejected"
STATUSES = (PENDING, ACCEPTED, CORRECTED, REJECTED)
#: The columns of the CLI's ``<stem>_points.csv`` (:meth:`SegmentationResult.points_rows`).
SHARED_COLUMNS = ("slice", "i", "j", "k", "image_score", "predicted_iou", "anomalous", "prompt")
REVIEW_COLUMNS = ("status", "orig_i", "orig_j", "orig_k", "displacement_mm", "has_lesion", "in_lesion_before",
                  "in_lesion_after", "slice_dice_before", "slice_dice_after", "volume_dice_before", "volume_dice_after")
VOLUME_COLUMNS = ("volume", "volume_shape", "affine", "backbone", "settings")
QA_COLUMNS = SHARED_COLUMNS + REVIEW_COLUMNS + VOLUME_COLUMNS
#: Optional volume columns (files saved before lesions existed lack them): the saved lesions, the
#: whole-lesion review and, with a ground truth, the BraTS lesion-wise scores of the saved lesions.
LESION_QA_COLUMNS = ("lesions", "lesions_accepted", "lesions_rejected", "lesionwise_dice", "lesionwise_hd95",
                     "true_lesions", "lesions_detected", "lesions_missed", "lesions_false_positive")
QA_SUFFIX = "_qa.csv"
REPORT_NAMES = ("qa_report.json", "qa_report.md", "qa_displacement.png")

_FLOATS = ("i", "j", "k", "image_score", "predicted_iou", "orig_i", "orig_j", "orig_k", "displacement_mm",
           "slice_dice_before", "slice_dice_after", "volume_dice_before", "volume_dice_after")
_BOOLS = ("has_lesion", "in_lesion_before", "in_lesion_after")


def qa_name(stem: str) -> str:
    return f"{stem}{QA_SUFFIX}"


def is_results_folder(path: str | Path) -> bool:
    """A folder holding a saved review (``*_qa.csv``)."""
    p = Path(path)
    return p.is_dir() and any(p.glob(f"*{QA_SUFFIX}"))


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return int(bool(v))
    if isinstance(v, (float, np.floating)):
        return round(float(v), 6)
    return v


def qa_csv_text(rows: list[dict]) -> str:
    """The QA table as CSV text (:data:`QA_COLUMNS`; missing values and NaN as empty cells)."""
    buf = _io.StringIO()
    cols = list(QA_COLUMNS) + list(LESION_QA_COLUMNS)
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _cell(r.get(c)) for c in cols})
    return buf.getvalue()


@dataclass
class QaTable:
    """One volume's QA file, typed: numbers as float (None where empty), flags as bool or None."""

    path: Path
    volume: str
    shape: tuple[int, ...]
    backbone: str
    settings: dict
    affine: np.ndarray | None = None
    rows: list[dict] = field(default_factory=list)

    def status(self, s: int) -> str:
        return next((r["status"] for r in self.rows if r["slice"] == s), "")


_DICE = ("slice_dice_before", "slice_dice_after", "volume_dice_before", "volume_dice_after")
_CENTRES = (("i", "j", "k"), ("orig_i", "orig_j", "orig_k"))
#: Columns with one value for the whole file (one QA file holds one volume's review).
_SAME_ON_EVERY_ROW = VOLUME_COLUMNS + ("volume_dice_before", "volume_dice_after")


def _bad(path: Path, line: int, what: str) -> InputError:
    return InputError(f"{path}: line {line}: {what}; save the QA file again from the viewer.")


def _number(path: Path, line: int, col: str, text: str) -> float | None:
    """A numeric cell: empty (or NaN, as other tools write it) is None; anything else must be a finite number."""
    t = text.strip()
    if t == "" or t.lower() == "nan":
        return None
    try:
        v = float(t)
    except ValueError:
        raise _bad(path, line, f"{col} {t!r} is not a number") from None
    if not math.isfinite(v):
        raise _bad(path, line, f"{col} {t} is not a finite number")
    return v


def _flag(path: Path, line: int, col: str, text: str) -> bool | None:
    t = text.strip().lower()
    if t == "":
        return None
    if t in ("0", "1", "0.0", "1.0", "true", "false"):
        return t in ("1", "1.0", "true")
    raise _bad(path, line, f"{col} {text!r} is not 0 or 1")


def _parse_row(path: Path, line: int, cells: list[str], header: list[str]) -> dict:
    """One row's cells, typed and checked for what they mean (ranges, finite numbers, 0/1 flags)."""
    raw = dict(zip(header, cells))
    row: dict[str, Any] = dict(raw)
    try:
        row["slice"] = int(raw["slice"])
    except ValueError:
        raise _bad(path, line, f"slice {raw['slice']!r} is not a slice number") from None
    row["anomalous"] = int(_flag(path, line, "anomalous", raw["anomalous"]) or False)
    for c in _FLOATS:
        row[c] = _number(path, line, c, raw[c])
    for c in _BOOLS:
        row[c] = _flag(path, line, c, raw[c])
    for c in LESION_QA_COLUMNS:  # optional: files saved before lesions existed lack them
        row[c] = _number(path, line, c, raw[c]) if c in raw else None
    if row["status"] not in STATUSES + ("",):
        raise _bad(path, line, f"status '{row['status']}' is not one of {', '.join(STATUSES)}")
    for c in _DICE:
        if row[c] is not None and not 0.0 <= row[c] <= 1.0:
            raise _bad(path, line, f"{c} {row[c]:g} is outside [0, 1], where a Dice lies")
    if row["displacement_mm"] is not None and row["displacement_mm"] < 0:
        raise _bad(path, line, f"displacement_mm {row['displacement_mm']:g} is negative (a distance)")
    return row


def _cut_short(path: Path, line: int, cells: list[str], header: list[str], last: bool) -> InputError:
    got = len(cells)
    where = f"ends after {got} of the {len(header)} columns (in '{header[got - 1]}')" if got else "is empty"
    if last:
        return InputError(f"{path}: line {line} {where}: the file is cut short (an interrupted copy or save?); "
                          "save the QA file again from the viewer.")
    return _bad(path, line, f"{got} cells where the header has {len(header)}")


def _check_geometry(path: Path, rows: list[tuple[int, dict]], shape: tuple[int, ...], affine: np.ndarray | None) -> None:
    """Prompt centres inside the volume, displacements no longer than its diagonal, and one row
    per slice along the slicing axis (found from the centres: the axis whose index is the slice)."""
    dims = np.asarray(shape, dtype=float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0) if affine is not None else np.ones(3)
    diagonal = float(np.linalg.norm((dims - 1) * spacing)) if len(shape) == 3 else math.inf
    axes = set(range(len(shape)))
    for line, r in rows:
        for cols in _CENTRES:
            vals = [r[c] for c in cols]
            for c, v, n in zip(cols, vals, shape):
                if v is not None and not -0.5 <= v <= n - 0.5:
                    raise _bad(path, line, f"{c} {v:g} lies outside the volume ({'x'.join(map(str, shape))})")
            if cols[0] == "i" and None not in vals:
                axes &= {a for a in range(len(shape)) if round(vals[a]) == r["slice"]}
        if r["displacement_mm"] is not None and r["displacement_mm"] > diagonal + 1e-6:
            raise _bad(path, line, f"displacement_mm {r['displacement_mm']:g} is longer than the volume's diagonal "
                                   f"({diagonal:.1f} mm)")
    if len(shape) != 3:
        return
    counts = sorted({shape[a] for a in (axes or range(3))})
    if len(rows) not in counts and len(rows) < max(counts):
        expected = min(c for c in counts if c > len(rows))
        raise InputError(f"{path}: ends at line {rows[-1][0]} after {len(rows)} of the volume's {expected} slices "
                         f"(slice {rows[-1][1]['slice']} is the last): the file is cut short (an interrupted copy or save?); "
                         "save the QA file again from the viewer.")


def read_qa(path: str | Path) -> QaTable:
    """Read a ``<stem>_qa.csv`` and check what every cell means; a one-line :class:`InputError`
    naming the line for a file that is not one: empty, missing columns, separated by ';', cut
    short (a last row without all its cells, or fewer rows than the volume's slices), two files
    joined, values out of range (a Dice outside [0, 1], a negative, infinite or impossibly long
    displacement, a prompt centre outside the volume, a flag other than 0/1), or rows that
    disagree on the volume."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass a <stem>_qa.csv file (or give the folder to qa-report).")
    if not path.is_file():
        raise InputError(f"{path}: no such QA file; pass the <stem>_qa.csv saved from the viewer.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a QA file ({exc}).") from None
    if not text.strip():
        raise InputError(f"{path}: is empty ({path.stat().st_size} bytes): the save was interrupted? Save the QA file again from the viewer.")
    reader = csv.reader(_io.StringIO(text))
    header = next(reader)
    missing = [c for c in QA_COLUMNS if c not in header]
    if missing:
        for sep, name in ((";", "';'"), ("\t", "tabs")):
            if len(header) < 3 and sep in text.splitlines()[0]:
                raise InputError(f"{path}: its cells are separated by {name}, not commas (re-saved by a spreadsheet?); "
                                 "save it again from the viewer, or export it as comma-separated CSV.")
        named = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise InputError(f"{path}: not a MIAS-SAM QA file: missing column{'s' if len(missing) > 1 else ''} {named}; "
                         "save it from the viewer (File > Save Selected Layers on the CoG layer).")
    records = [(reader.line_num, cells) for cells in reader if cells]
    rows: list[tuple[int, dict]] = []
    for n, (line, cells) in enumerate(records):
        if cells == header:
            raise _bad(path, line, "repeats the header: two QA files joined into one? One QA file holds one volume")
        if len(cells) != len(header):
            if len(cells) > len(header):
                raise _bad(path, line, f"{len(cells)} cells where the header has {len(header)}")
            raise _cut_short(path, line, cells, header, last=n == len(records) - 1)
        rows.append((line, _parse_row(path, line, cells, header)))
    if not rows:
        raise InputError(f"{path}: the QA file has no rows.")
    first_line, first = rows[0]
    for line, r in rows[1:]:
        for c in _SAME_ON_EVERY_ROW:
            if r[c] != first[c]:
                raise _bad(path, line, f"{c} {r[c]!r} differs from line {first_line}'s {first[c]!r}; one QA file holds "
                                       "one volume's review")
    try:
        shape = tuple(int(x) for x in str(first["volume_shape"]).split("x"))
        settings = json.loads(first["settings"]) if first["settings"] else {}
        affine = np.asarray(json.loads(first["affine"]), dtype=float).reshape(4, 4) if first["affine"] else None
    except ValueError as exc:
        raise _bad(path, first_line, f"bad volume_shape, affine or settings ({exc})") from None
    if affine is not None and not np.isfinite(affine).all():
        raise _bad(path, first_line, "the affine holds NaN or infinite values")
    slices = [r["slice"] for _, r in rows]
    if len(set(slices)) != len(slices) or min(slices) < 0 or (len(shape) == 3 and max(slices) >= max(shape)):
        raise InputError(f"{path}: slice numbers repeat or lie outside the volume; save the QA file again from the viewer.")
    _check_geometry(path, rows, shape, affine)
    return QaTable(path=path, volume=str(first["volume"]), shape=shape, backbone=str(first["backbone"]),
                   settings=settings, affine=affine, rows=sorted((r for _, r in rows), key=lambda r: r["slice"]))


def check_same_volume(table: QaTable, volume: str, shape: Iterable[int], n_slices: int) -> None:
    """Refuse (one line) a QA file of another volume than ``volume`` with ``shape``."""
    shape = tuple(int(x) for x in shape)
    if table.volume != volume or table.shape != shape or len(table.rows) != n_slices:
        raise InputError(f"{table.path}: QA file of volume '{table.volume}' ({'x'.join(map(str, table.shape))}, "
                         f"{len(table.rows)} slices), not of '{volume}' ({'x'.join(map(str, shape))}, {n_slices} slices); "
                         f"open the QA file saved for '{volume}'.")


# -- qa-report ------------------------------------------------------------------------------------
def _mean(vals: list) -> float | None:
    vals = [float(v) for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _median(vals: list) -> float | None:
    vals = [float(v) for v in vals if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else None


def _rate(flags: list) -> float | None:
    return float(np.mean([bool(f) for f in flags])) if flags else None


def _volume_summary(t: QaTable) -> dict:
    prompted = [r for r in t.rows if r["status"]]
    counts = {s: sum(r["status"] == s for r in prompted) for s in STATUSES}
    lesion = [r for r in prompted if r["has_lesion"]]
    # Hit rate: prompted slices that hold lesion whose prompt centre lies in it; after review a
    # rejected lesion slice is a miss (no prompt is kept there).
    before = [r["in_lesion_before"] for r in lesion if r["in_lesion_before"] is not None]
    after = [bool(r["in_lesion_after"]) and r["status"] != REJECTED for r in lesion if r["in_lesion_after"] is not None]
    dice_rows = [r for r in t.rows if r["has_lesion"]]
    corrected = [r for r in prompted if r["status"] == CORRECTED]
    return {
        "volume": t.volume, "file": str(t.path), "backbone": t.backbone, "slices": len(t.rows), "prompted": len(prompted),
        "reviewed": len(prompted) - counts[PENDING], **counts,
        "ground_truth": any(r["has_lesion"] is not None for r in t.rows), "lesion_slices": len(dice_rows),
        "hit_rate_before": _rate(before), "hit_rate_after": _rate(after), "hit_slices": len(before),
        "median_displacement_mm": _median([r["displacement_mm"] for r in corrected]),
        "slice_dice_before": _mean([r["slice_dice_before"] for r in dice_rows]),
        "slice_dice_after": _mean([r["slice_dice_after"] for r in dice_rows]),
        "volume_dice_before": t.rows[0]["volume_dice_before"], "volume_dice_after": t.rows[0]["volume_dice_after"],
        "corrections": [{"slice": r["slice"], "image_score": r["image_score"], "displacement_mm": r["displacement_mm"]}
                        for r in corrected],
        **{c: t.rows[0].get(c) for c in LESION_QA_COLUMNS},
    }


def summarise(tables: list[QaTable]) -> dict:
    """Per volume and overall: slices reviewed, accepted / corrected / rejected, the prompt's hit
    rate inside the lesion before and after review, the median displacement of corrections (mm),
    mean slice Dice over lesion slices and volume Dice, before and after review.

    Overall figures pool every slice (hit rates, the median displacement and the slice Dice are
    over all volumes' slices together); the volume Dice is the mean over volumes with a ground
    truth. A volume given twice is refused (it would count twice)."""
    seen: dict[str, Path] = {}
    for t in tables:
        if t.volume in seen:
            raise InputError(f"{t.path}: volume '{t.volume}' is already given by {seen[t.volume]}; pass one QA file per volume.")
        seen[t.volume] = t.path
    per = [_volume_summary(t) for t in tables]
    pooled = [r for t in tables for r in t.rows]
    overall = _volume_summary(QaTable(path=Path("-"), volume="all", shape=(), backbone="", settings={}, rows=pooled))
    overall.update(volume="all", file=None, backbone=sorted({t.backbone for t in tables}), volumes=len(tables),
                   volume_dice_before=_mean([p["volume_dice_before"] for p in per]),
                   volume_dice_after=_mean([p["volume_dice_after"] for p in per]))
    overall["corrections"] = [dict(c, volume=p["volume"]) for p in per for c in p["corrections"]]
    for c in LESION_QA_COLUMNS:  # counts add up over volumes; lesion-wise scores are means over volumes with them
        vals = [p[c] for p in per if p.get(c) is not None]
        overall[c] = (_mean(vals) if c.startswith("lesionwise") else float(sum(vals))) if vals else None
    return {"volumes": per, "overall": overall}


def _f(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def report_text(summary: dict) -> str:
    """The summary as a Markdown table (one row per volume, then all volumes)."""
    head = ("| volume | reviewed | accepted | corrected | rejected | pending | CoG in lesion before | after | "
            "median correction (mm) | slice Dice before | after | volume Dice before | after |")
    lines = [head, "|" + "---|" * 13]
    for p in summary["volumes"] + [summary["overall"]]:
        name = p["volume"] if p["volume"] != "all" else f"**all ({p['volumes']} volume{'s' if p['volumes'] != 1 else ''})**"
        lines.append(
            f"| {name} | {p['reviewed']} of {p['prompted']} | {p['accepted']} | {p['corrected']} | {p['rejected']} | "
            f"{p['pending']} | {_f(p['hit_rate_before'], True)} | {_f(p['hit_rate_after'], True)} | "
            f"{'-' if p['median_displacement_mm'] is None else format(p['median_displacement_mm'], '.1f')} | "
            f"{_f(p['slice_dice_before'])} | {_f(p['slice_dice_after'])} | {_f(p['volume_dice_before'])} | "
            f"{_f(p['volume_dice_after'])} |")
    lines.append("\nCoG in lesion: prompted slices holding lesion whose prompt centre lies in it (a rejected one "
                 "counts as a miss after review). Slice Dice: mean over lesion slices. '-': no ground truth was "
                 "picked, or nothing to count.")
    rows = [p for p in summary["volumes"] + [summary["overall"]] if p.get("lesions") is not None]
    if rows:
        def n(v) -> str:
            return "-" if v is None else str(int(v))

        lines.append("\n| volume | lesions saved | accepted | rejected | lesion-wise Dice | lesion-wise HD95 (mm) | true lesions "
                     "| detected | missed | false positives |")
        lines.append("|" + "---|" * 10)
        for p in rows:
            name = p["volume"] if p["volume"] != "all" else "**all**"
            hd = "-" if p["lesionwise_hd95"] is None else f"{p['lesionwise_hd95']:.1f}"
            lines.append(f"| {name} | {n(p['lesions'])} | {n(p['lesions_accepted'])} | {n(p['lesions_rejected'])} | "
                         f"{_f(p['lesionwise_dice'])} | {hd} | {n(p['true_lesions'])} | {n(p['lesions_detected'])} | "
                         f"{n(p['lesions_missed'])} | {n(p['lesions_false_positive'])} |")
        lines.append("\nLesions: the saved mask's 3D connected components; rejected ones were removed from the mask and "
                     "the lesion files. Lesion-wise scores: the BraTS 2023 rule on the saved lesions.")
    return "\n".join(lines) + "\n"
