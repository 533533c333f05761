"""A segmentation result's lesions: its final mask's 3D components with ids, the table's rows, and
the review of whole lesions (accept; reject = remove from the mask and the lesion files).

Computed once per pass (:func:`result_lesions`), never per slider tick: the live path re-decodes
single slices and asks for lesions only when the dock's table or a save needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..method.lesions import Lesion, LesionRule, assign_prompts, describe_lesions, label_lesions, lesion_rows, remove_lesions

__all__ = ["LesionSet", "result_lesions", "lesion_set"]


@dataclass
class LesionSet:
    """The lesions of one volume: the id volume (input grid), one :class:`Lesion` per id, the rule
    that made them and the mask they came from (which a rejection edits too)."""

    labels: np.ndarray
    lesions: list[Lesion]
    rule: LesionRule
    mask: np.ndarray
    rejected: list[int] = field(default_factory=list)

    def ids(self) -> list[int]:
        return [les.id for les in self.lesions]

    def get(self, lesion_id: int) -> Lesion:
        for les in self.lesions:
            if les.id == int(lesion_id):
                return les
        raise KeyError(f"no lesion {lesion_id} (the lesions are {', '.join(map(str, self.ids())) or 'none'})")

    def rows(self) -> list[dict]:
        """``<stem>_lesions.csv``'s rows (:data:`~napari_mias_sam.method.lesions.LESION_COLUMNS`)."""
        return lesion_rows(self.lesions)

    def accept(self, lesion_id: int) -> None:
        self.get(lesion_id).review = "accepted"

    def reject(self, lesion_id: int) -> None:
        """Remove lesion ``lesion_id`` from the table, the id volume and the mask (the other ids stay)."""
        les = self.get(lesion_id)
        self.labels, self.mask = remove_lesions(self.labels, self.mask, [les.id])
        self.lesions = [x for x in self.lesions if x.id != les.id]
        self.rejected.append(les.id)

    def mark_matches(self, lesionwise_result: dict) -> None:
        """Each lesion's ``match`` from a :func:`~napari_mias_sam.evaluation.lesionwise.lesionwise` result."""
        status = {r["id"]: r["status"] for r in lesionwise_result.get("pred", [])}
        for les in self.lesions:
            les.match = status.get(les.id, "")

    def summary(self) -> dict:
        return {"rule": self.rule.describe(), "connectivity": self.rule.connectivity, "min_voxels": self.rule.min_voxels,
                "count": len(self.lesions), "total_ml": round(sum(x.volume_ml for x in self.lesions), 4),
                "rejected": list(self.rejected)}


def lesion_set(mask: np.ndarray, affine: np.ndarray, *, axis: int, rule: LesionRule | None = None,
               scores: np.ndarray | None = None, prompt_centres: dict | None = None) -> LesionSet:
    """The :class:`LesionSet` of a mask on a voxel grid (arrays only: what the viewer has)."""
    rule = rule or LesionRule()
    mask = np.asarray(mask)
    labels = label_lesions(mask, rule)
    prompts = assign_prompts(labels, axis, prompt_centres) if prompt_centres else None
    lesions = describe_lesions(labels, affine, axis=axis, scores=scores, prompts=prompts)
    return LesionSet(labels=labels, lesions=lesions, rule=rule, mask=mask.copy())


def result_lesions(result, rule: LesionRule | None = None, *, mask: np.ndarray | None = None) -> LesionSet:
    """The lesions of a :class:`~napari_mias_sam.pipeline.segment.SegmentationResult` (its mask, or
    ``mask`` when the viewer's reviewed mask differs), scored with its anomaly volume and given
    the prompts of its kept slices."""
    m = result.mask_volume() if mask is None else np.asarray(mask)
    centres = {}
    for s in range(result.n_slices):
        p = result.prompts[s]
        if p is not None and result.decision[s]:
            centres[s] = [(p.kind, c) for c in result.prompt_centres(s)]
    return lesion_set(m, result.volume.affine, axis=result.axis, rule=rule, scores=result.anomaly_volume(),
                      prompt_centres=centres)

