"""The lesion step both front ends run after a segmentation: the rule from the user's options, the
result's lesions, and (with a ground truth) the lesion-wise scores that mark each lesion matched or
false positive and list the missed true lesions."""

from __future__ import annotations

import numpy as np

from ..core import defaults
from ..core.errors import InputError
from ..evaluation.lesionwise import LesionwiseRule, lesionwise
from ..method.lesions import CONNECTIVITIES, LesionRule, min_voxels_for_ml
from ..pipeline.lesion_set import LesionSet, result_lesions

__all__ = ["lesion_rule", "lesions_for", "lesion_report", "lesion_line"]


def lesion_rule(connectivity: int | None = None, min_voxels: int | None = None, min_ml: float | None = None,
                affine: np.ndarray | None = None) -> LesionRule:
    """The rule of ``--lesion-connectivity`` and ``--min-lesion-voxels`` / ``--min-lesion-ml`` (one
    or the other; mL needs the volume's affine). Bad values: a one-line :class:`InputError`."""
    conn = defaults.LESION_CONNECTIVITY if connectivity is None else int(connectivity)
    if conn not in CONNECTIVITIES:
        raise InputError(f"--lesion-connectivity must be 6, 18 or 26, got {connectivity}")
    if min_voxels is not None and min_ml is not None:
        raise InputError("give --min-lesion-voxels or --min-lesion-ml, not both")
    if min_ml is not None:
        if min_ml < 0:
            raise InputError(f"--min-lesion-ml must be 0 or more, got {min_ml:g}")
        n = min_voxels_for_ml(min_ml, np.eye(4) if affine is None else affine)
    else:
        n = defaults.MIN_LESION_VOXELS if min_voxels is None else int(min_voxels)
        if n < 1:
            raise InputError(f"--min-lesion-voxels must be at least 1, got {min_voxels}")
    return LesionRule(connectivity=conn, min_voxels=n)


def lesions_for(result, rule: LesionRule, gt: np.ndarray | None = None, *,
                scoring: LesionwiseRule = LesionwiseRule(), mask: np.ndarray | None = None) -> tuple[LesionSet, dict | None]:
    """The result's lesions under ``rule`` and, with ``gt`` (bool lesion mask on the same grid),
    their lesion-wise scores (each lesion's ``match`` set from them)."""
    ls = result_lesions(result, rule, mask=mask)
    if gt is None:
        return ls, None
    lw = lesionwise(ls.labels > 0, gt, result.volume.spacing, scoring, pred_labels=ls.labels)
    ls.mark_matches(lw)
    return ls, lw


def lesion_report(ls: LesionSet, lw: dict | None) -> dict:
    """The JSON of a run's lesions: the rule, the count, and the lesion-wise scores when scored."""
    out = {**ls.summary(), "lesions": ls.rows()}
    if lw is not None:
        out["lesionwise"] = {k: v for k, v in lw.items()}
        out["missed_true_lesions"] = [r for r in lw["gt"] if r["status"] == "missed"]
    return out


def lesion_line(ls: LesionSet, lw: dict | None) -> str:
    """One line for the console."""
    text = f"{len(ls.lesions)} lesions ({ls.rule.describe()}), {sum(x.volume_ml for x in ls.lesions):.2f} mL"
    if lw is not None:
        text += (f"; lesion-wise Dice {lw['lesionwise_dice']:.3f}, HD95 {lw['lesionwise_hd95']:.1f} mm; true lesions "
                 f"detected {lw['detected']}/{lw['gt_lesions']}, missed {lw['missed']}, false positives {lw['false_positives']}")
    return text
