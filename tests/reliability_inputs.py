"""Inputs of the reliability catalogue's second round (issue 26): dataset roots (BraTS 2021, BraTS
2023, both mixed in one root, LiTS), QA files damaged the ways files get damaged, weights files
that are not checkpoints, and private cache folders with something in them.

Everything is written under the folder it is given; the dataset roots are made once per test
module (:func:`dataset_roots`), from the bundled sample (tests/dataset_fixtures.py).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from dataset_fixtures import brats2021_root, brats2023_root, brats_case, lits_root

__all__ = ["dataset_roots", "qa_text", "qa_file", "weights_file", "cache_folder"]


def dataset_roots(folder: Path) -> dict[str, Path]:
    """``b21``: BraTS 2021 (two cases with a tumour, one without); ``b23``: BraTS 2023 (one of each);
    ``mixed``: two 2021 and two 2023 cases in one root; ``lits``: four LiTS pairs. Also ``tumours``,
    a subject list of the two 2021 cases with a tumour, and ``mixed21``, the 2021 cases of ``mixed``."""
    out = {"b21": brats2021_root(folder / "brats2021"), "b23": brats2023_root(folder / "brats2023"),
           "lits": lits_root(folder / "lits")}
    mixed = folder / "mixed"
    brats_case(mixed, "BraTS2021_00001", "case_01")
    brats_case(mixed, "BraTS2021_00003", "normal_01")
    brats_case(mixed, "BraTS-GLI-00002-000", "case_02", new_names=True)
    brats_case(mixed, "BraTS-GLI-00004-000", "normal_02", new_names=True)
    out["mixed"] = mixed
    out["tumours"] = folder / "tumours.txt"
    out["tumours"].write_text("BraTS2021_00001\nBraTS2021_00002\n")
    out["mixed21"] = folder / "mixed21.txt"
    out["mixed21"].write_text("BraTS2021_00001\nBraTS2021_00003\n")
    return out


# -- QA files ---------------------------------------------------------------------------------------
def _rows(n: int = 4) -> list[dict]:
    nan = float("nan")
    rows = []
    for s in range(n):
        lesion = s in (1, 2)
        status = ("", "accepted", "corrected", "rejected")[s % 4]
        rows.append({"slice": s, "i": 10.0, "j": 20.0, "k": float(s), "image_score": 0.5 + s, "predicted_iou": 0.9,
                     "anomalous": 1, "prompt": "box" if status else "none", "status": status, "orig_i": 10.0,
                     "orig_j": 20.0 if status != "corrected" else 24.0, "orig_k": float(s),
                     "displacement_mm": 4.0 if status == "corrected" else (0.0 if status else None),
                     "has_lesion": lesion, "in_lesion_before": lesion and status != "corrected" if status else None,
                     "in_lesion_after": lesion if status else None,
                     "slice_dice_before": 0.6 if lesion else nan, "slice_dice_after": 0.7 if lesion else nan,
                     "volume_dice_before": 0.5, "volume_dice_after": 0.6, "volume": "case", "volume_shape": f"30x40x{n}",
                     "affine": json.dumps([1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 2.0, 0, 0, 0, 0, 1.0]),
                     "backbone": "litemedsam", "settings": json.dumps({"gamma": 5.0}, separators=(",", ":"))})
    return rows


def qa_text(edit=None, n: int = 4) -> str:
    """A good QA table of a 30 x 40 x ``n`` volume 'case' as CSV text; ``edit(rows)`` changes the rows first."""
    from napari_mias_sam.data.qa_table import qa_csv_text

    rows = _rows(n)
    if edit is not None:
        edit(rows)
    return qa_csv_text(rows)


def raw_cell(text: str, line: int, col: str, value: str) -> str:
    """``text`` with the cell of column ``col`` on (0-based) ``line`` replaced by the raw ``value``."""
    from napari_mias_sam.data.qa_table import QA_COLUMNS

    lines = text.splitlines(keepends=True)
    cells = lines[line].rstrip("\n").split(",")
    cells[QA_COLUMNS.index(col)] = value  # the columns before 'affine' hold no commas
    lines[line] = ",".join(cells) + "\n"
    return "".join(lines)


def qa_file(folder: Path, kind: str, name: str = "case_qa.csv") -> Path:
    """A QA file damaged as ``kind`` says (see the catalogue's Q cases)."""
    p = folder / name
    text = qa_text()
    lines = text.splitlines(keepends=True)
    last = lines[-1]

    def cell(col: str, value) -> str:
        return qa_text(lambda rows: rows[2].update({col: value}))

    if kind == "good":
        p.write_text(text)
    elif kind == "crlf":
        p.write_bytes(text.replace("\n", "\r\n").encode())
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "header-only":
        p.write_text(lines[0])
    elif kind.startswith("cut-in-"):  # cut inside the last row, after the named column's first character
        col = kind.removeprefix("cut-in-")
        from napari_mias_sam.data.qa_table import QA_COLUMNS

        cells = last.split(",")
        upto = ",".join(cells[: QA_COLUMNS.index(col)]) + "," + cells[QA_COLUMNS.index(col)][:1]
        p.write_text("".join(lines[:-1]) + upto)
    elif kind == "rows-missing":  # a copy that stopped at the end of a row: slices 0-1 of 4
        p.write_text("".join(lines[:3]))
    elif kind == "joined":  # two QA files concatenated (cat a_qa.csv b_qa.csv > all_qa.csv)
        p.write_text(text + text)
    elif kind == "semicolons":  # re-saved by a spreadsheet with ';' between cells
        p.write_text(text.replace(",", ";"))
    elif kind == "dice-5e300":
        p.write_text(cell("slice_dice_before", 5e300))
    elif kind == "dice-negative":
        p.write_text(cell("slice_dice_after", -0.2))
    elif kind == "volume-dice-1.5":
        p.write_text(qa_text(lambda rows: [r.update(volume_dice_after=1.5) for r in rows]))
    elif kind == "volume-dice-differs":
        p.write_text(cell("volume_dice_before", 0.9))
    elif kind == "displacement-1e308":
        p.write_text(cell("displacement_mm", 1e308))
    elif kind == "displacement-negative":
        p.write_text(cell("displacement_mm", -4.0))
    elif kind in ("displacement-inf", "dice-nan"):  # words the writer never writes (it leaves NaN cells empty)
        col, word = ("displacement_mm", "inf") if kind == "displacement-inf" else ("slice_dice_before", "nan")
        p.write_text(raw_cell(text, 3, col, word))
    elif kind == "flag-7":
        p.write_text(cell("in_lesion_before", 7))
    elif kind == "centre-outside":
        p.write_text(cell("i", 1e6))
    elif kind == "shape-differs":
        p.write_text(cell("volume_shape", "30x40x5"))
    else:
        raise AssertionError(kind)
    return p


# -- weights files ----------------------------------------------------------------------------------
def weights_file(folder: Path, kind: str) -> Path:
    """A file given as a checkpoint: ``empty``, ``random``, ``truncated`` (a real state dict cut in
    half), ``object`` (a pickled Python object), ``tensor`` (one tensor, no names), ``zip`` (a zip of
    text), ``state-dict`` (a small real state dict), ``folder`` (a folder holding a .pth),
    ``dangling`` (a link to nothing)."""
    import argparse

    import torch

    p = folder / f"{kind}.pth"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "random":
        p.write_bytes(np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind in ("truncated", "state-dict"):
        torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8), "mask_decoder.iou_token.weight": torch.ones(1, 8)}, p)
        if kind == "truncated":
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])
    elif kind == "object":
        torch.save(argparse.Namespace(lr=0.1, epochs=3), p)
    elif kind == "tensor":
        torch.save(torch.zeros(4, 4), p)
    elif kind == "zip":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("notes.txt", "not weights")
    elif kind == "folder":
        p = folder / "weights"
        p.mkdir()
        (p / "sam_vit_b_01ec64.pth").write_bytes(b"x" * 100)
    elif kind == "dangling":
        p.symlink_to(folder / "moved-away.pth")
    else:
        raise AssertionError(kind)
    return p


# -- cache folders ------------------------------------------------------------------------------------
def cache_folder(folder: Path, *, onnx: bool = True, user_files: bool = False, settings: str | None = None) -> Path:
    """A cache folder as a user has one: two embeddings, an exported ONNX model, a downloaded
    weights file; ``user_files``: also files the tool did not make (MIAS_SAM_CACHE pointed at a
    folder of the user's); ``settings``: the text of cache-settings.json."""
    root = folder / "cache"
    (root / "embeddings").mkdir(parents=True)
    for n in range(2):
        np.save(root / "embeddings" / f"{n:064x}.npy", np.zeros((1, 8), np.float16))
    if onnx:
        (root / "onnx").mkdir()
        (root / "onnx" / "litemedsam-encoder-0123456789abcdef-in256-bs1-op17-v1.onnx").write_bytes(b"\0" * 2048)
    (root / "weights").mkdir()
    (root / "weights" / "sam_vit_b_01ec64.pth").write_bytes(b"\0" * 1024)
    if user_files:
        (root / "thesis.tex").write_text("my thesis")
        (root / "scans").mkdir()
        (root / "scans" / "patient1.nii.gz").write_bytes(b"\0" * 512)
    if settings is not None:
        (root / "cache-settings.json").write_text(settings)
    return root
