"""Lesion labels: which label values of a ground truth count as the anomaly, as the user writes
them (``1,2,4``, ``nonzero``), the binary mask they make, how they are reported, and the check of
user-given labels against the labels the ground truths hold (a typo such as ``999``, or BraTS
2023's numbering on a 2021 case, is refused or warned before any work, never scored as Dice 0).

``None`` stands for "any non-zero label"; a tuple lists the values.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Iterable

import numpy as np

from ..core.errors import InputError

__all__ = ["LesionLabels", "LesionLabelsWarning", "parse_lesion_labels", "lesion_mask", "lesion_description",
           "label_values", "check_lesion_labels"]

#: ``None``: every non-zero label is a lesion; a tuple: those label values.
LesionLabels = tuple[int, ...] | None
_LARGEST_LABEL = 2**31 - 1  # ground truths are read as int32


def parse_lesion_labels(text: str | None) -> LesionLabels:
    """``"1,2,4"`` -> ``(1, 2, 4)``; empty, ``"nonzero"`` or ``"any"`` -> ``None`` (every non-zero)."""
    if text is None:
        return None
    t = str(text).strip().lower()
    if t in ("", "nonzero", "non-zero", "any", "all"):
        return None
    try:
        vals = tuple(sorted({int(v) for v in re.split(r"[,\s]+", t) if v}))
    except ValueError as exc:
        raise InputError(f"lesion labels: expected integers such as 1,2,4 (or 'nonzero'), got {text!r}") from exc
    if not vals:
        return None
    if 0 in vals:
        raise InputError(f"lesion labels: 0 is the background and cannot be a lesion label (got {text!r}).")
    if vals[0] < 0:
        raise InputError(f"lesion labels {text!r}: {vals[0]} is not a label value (labels are whole numbers from 1 up; "
                         "a ground truth with negative values is refused).")
    if vals[-1] > _LARGEST_LABEL:
        raise InputError(f"lesion labels {text!r}: {vals[-1]} is larger than any label a ground truth holds "
                         f"(at most {_LARGEST_LABEL:,}).")
    return vals


def lesion_mask(labels: np.ndarray, lesion: LesionLabels = None) -> np.ndarray:
    """The binary ground truth of a label volume: True where the label is a lesion label
    (``None``: any non-zero label). The one place where labels become the anomaly."""
    arr = np.asarray(labels)
    if lesion is None:
        return arr != 0
    return np.isin(arr, np.asarray(lesion, dtype=np.int64))  # int64: a label beyond the array's type matches nothing


def lesion_description(lesion: LesionLabels, labels: np.ndarray | None = None, *, source: str = "") -> dict:
    """What counted as the lesion, for reports: the rule, the values present that counted, and
    where the choice came from."""
    out: dict = {"rule": "any non-zero label" if lesion is None else "labels " + ",".join(map(str, lesion)),
                 "labels": None if lesion is None else list(lesion)}
    if labels is not None:
        present = [int(v) for v in np.unique(np.asarray(labels)) if v != 0]
        out["present"] = present
        out["counted"] = present if lesion is None else [v for v in present if v in lesion]
    if source:
        out["source"] = source
    return out


class LesionLabelsWarning(UserWarning):
    """Lesion labels that some ground truths do not hold (their lesion is then empty)."""


def label_values(path: str | os.PathLike) -> list[int]:
    """The label values other than 0 that a ground-truth file holds (checked as ``load_labels`` does)."""
    from .volumes import load_labels

    return [int(v) for v in np.unique(load_labels(path).data) if v != 0]


def _brats_hint(lesion: tuple[int, ...], held: set[int]) -> str:
    if (3 in lesion and 4 in held and 3 not in held) or (4 in lesion and 3 in held and 4 not in held):
        return " (BraTS 2021 numbers the enhancing tumour 4, BraTS 2023 numbers it 3)"
    return ""


def check_lesion_labels(lesion: LesionLabels, present: dict[str, Iterable[int]], *, source: str = "lesion labels") -> None:
    """User-given lesion labels against the label values the ground truths hold (``present``: a
    name per ground truth -> its values other than 0), before any work.

    Refused (one-line :class:`InputError`) when no ground truth holds any of the labels although
    they hold others: every lesion would be empty and every Dice 0 or undefined. A
    :class:`LesionLabelsWarning` names labels that no ground truth holds, and each ground truth
    (of several) that holds none of them. ``lesion=None`` (any non-zero label) is never refused."""
    if lesion is None or not present:
        return
    have = {str(n): sorted({int(v) for v in vals}) for n, vals in present.items()}
    held = set().union(*map(set, have.values()))

    def holds(name: str) -> str:
        return f"{name} holds {', '.join(map(str, have[name])) or 'no label'}"

    listing = "; ".join(holds(n) for n in list(have)[:3]) + (f"; and {len(have) - 3} more" if len(have) > 3 else "")
    wanted = ",".join(map(str, lesion))
    if held and not held & set(lesion):
        raise InputError(f"{source}: no ground truth holds label{'s' if len(lesion) > 1 else ''} {wanted} ({listing}), so "
                         f"every lesion would be empty; choose among {', '.join(map(str, sorted(held)))}"
                         f"{_brats_hint(lesion, held)}.")
    absent = [v for v in lesion if v not in held]
    if absent:
        warnings.warn(f"{source}: label{'s' if len(absent) > 1 else ''} {', '.join(map(str, absent))} occur{'s' if len(absent) == 1 else ''} "
                      f"in no ground truth ({listing}); they count nothing{_brats_hint(lesion, held)}.", LesionLabelsWarning, stacklevel=2)
    if len(have) > 1:
        for name, vals in have.items():
            if vals and not set(vals) & set(lesion):
                warnings.warn(f"{name}: holds none of the lesion labels {wanted} (it holds {', '.join(map(str, vals))}); "
                              "its lesion is empty.", LesionLabelsWarning, stacklevel=2)
