"""The dock's lesions table without Qt: a live session's lesions (computed on demand, once per
refresh, never per slider tick), sorted for display, each with where the viewer should jump; the
review of whole lesions (accept; reject = out of the shown mask, the saved mask and the lesion
files); with a ground truth, each lesion's match and the missed true lesions."""

from __future__ import annotations

import numpy as np

from ...jobs.lesion_runs import lesions_for
from ...method.lesions import LesionRule
from ...pipeline.lesion_set import LesionSet
from .layers import to_display
from .live import LiveSession

__all__ = ["SORT_KEYS", "LesionReview"]

#: Table orders: largest first, most anomalous first, or by id.
SORT_KEYS = ("volume", "peak score", "mean score", "id")


class LesionReview:
    """The lesions of one :class:`LiveSession` and their review."""

    def __init__(self, session: LiveSession, rule: LesionRule | None = None) -> None:
        self.session = session
        self.rule = rule or LesionRule()
        self.lesions: LesionSet | None = None
        self.scores: dict | None = None  # lesion-wise result against the ground truth (None without one)
        self._accepted: list[tuple[int, int, int]] = []  # voxels inside accepted lesions (ids change on refresh)
        self._rejected: list[int] = []  # ids of rejected lesions, as they were numbered when rejected

    # -- computing ---------------------------------------------------------------------------------
    def refresh(self, gt: np.ndarray | None = None, rule: LesionRule | None = None) -> LesionSet:
        """Recompute the lesions of the shown mask (rejected lesions stay out) and, with ``gt``
        (file-order bool), their lesion-wise scores; accepted lesions stay accepted."""
        if rule is not None:
            self.rule = rule
        ses = self.session
        self.lesions, self.scores = lesions_for(ses.result, self.rule, gt, mask=ses.mask_volume())
        for ijk in self._accepted:
            lid = int(self.lesions.labels[ijk])
            if lid:
                self.lesions.accept(lid)
        self.lesions.rejected = list(self._rejected)
        return self.lesions

    # -- the table ---------------------------------------------------------------------------------
    def rows(self, sort: str = "volume") -> list[dict]:
        """Display rows: one per lesion (``kind`` "lesion"), then the missed true lesions (``kind``
        "missed"), each with ``target``, the display-order voxel to jump to."""
        if self.lesions is None:
            return []
        if sort not in SORT_KEYS:
            raise ValueError(f"sort by one of {', '.join(SORT_KEYS)}, got {sort!r}")
        key = {"volume": lambda x: -x.voxels, "peak score": lambda x: -(x.peak_score or 0.0),
               "mean score": lambda x: -(x.mean_score or 0.0), "id": lambda x: x.id}[sort]
        out = []
        for les in sorted(self.lesions.lesions, key=key):
            out.append({"kind": "lesion", "id": les.id, "voxels": les.voxels, "volume_ml": les.volume_ml,
                        "slices": f"{les.slice_range[0]}-{les.slice_range[1]}", "peak_score": les.peak_score,
                        "mean_score": les.mean_score, "match": les.match, "review": les.review,
                        "target": self.session.file_to_display(les.centroid_voxel)})
        for g in (self.scores or {}).get("gt", []):
            if g["status"] == "missed":
                out.append({"kind": "missed", "id": g["id"], "voxels": g["voxels"], "volume_ml": g["volume_ml"],
                            "slices": "", "peak_score": None, "mean_score": None, "match": "missed", "review": "",
                            "target": self.session.file_to_display(g["centre_voxel"])})
        return out

    def summary(self) -> str:
        if self.lesions is None:
            return "lesions: press Refresh lesions after a run"
        n = len(self.lesions.lesions)
        text = (f"{n} lesion{'s' if n != 1 else ''} ({self.rule.describe()}), "
                f"{sum(x.volume_ml for x in self.lesions.lesions):.2f} mL")
        if self._rejected:
            text += f"; {len(self._rejected)} rejected"
        if self.scores is not None:
            s = self.scores
            text += (f". Against the ground truth: lesion-wise Dice {s['lesionwise_dice']:.3f}, HD95 {s['lesionwise_hd95']:.1f} mm; "
                     f"{s['detected']} of {s['gt_lesions']} true lesions detected, {s['missed']} missed, "
                     f"{s['false_positives']} false positive{'s' if s['false_positives'] != 1 else ''}")
        return text

    # -- review --------------------------------------------------------------------------------------
    def accept(self, lesion_id: int) -> None:
        les = self._lesion(lesion_id)
        les.review = "accepted"
        self._accepted.append(self._inside(lesion_id))

    def reject(self, lesion_id: int) -> np.ndarray:
        """Take lesion ``lesion_id`` out of the shown mask (the session keeps it out of later live
        updates), the table and what Save results writes. Returns its voxels, display order."""
        self._lesion(lesion_id)
        gone = self.lesions.labels == int(lesion_id)
        ses = self.session
        ses.removed = gone if ses.removed is None else (ses.removed | gone)
        self.lesions.reject(int(lesion_id))
        self._rejected.append(int(lesion_id))
        self.lesions.rejected = list(self._rejected)
        self._accepted = [ijk for ijk in self._accepted if not gone[ijk]]
        return np.ascontiguousarray(to_display(gone, ses.axes))

    def labels_display(self) -> np.ndarray:
        """The lesion ids in display order (for the lesions Labels layer)."""
        return np.ascontiguousarray(to_display(self.lesions.labels, self.session.axes))

    def qa_fields(self) -> dict:
        """The QA table's lesion columns (:data:`~napari_mias_sam.data.qa_table.LESION_QA_COLUMNS`)."""
        if self.lesions is None:
            return {}
        out = {"lesions": len(self.lesions.lesions), "lesions_accepted": sum(x.review == "accepted" for x in self.lesions.lesions),
               "lesions_rejected": len(self._rejected)}
        if self.scores is not None:
            s = self.scores
            out.update(lesionwise_dice=s["lesionwise_dice"], lesionwise_hd95=s["lesionwise_hd95"], true_lesions=s["gt_lesions"],
                       lesions_detected=s["detected"], lesions_missed=s["missed"], lesions_false_positive=s["false_positives"])
        return out

    def _lesion(self, lesion_id: int):
        if self.lesions is None:
            raise ValueError("no lesions yet: refresh the lesions first")
        return self.lesions.get(int(lesion_id))

    def _inside(self, lesion_id: int) -> tuple[int, int, int]:
        idx = np.argwhere(self.lesions.labels == int(lesion_id))
        c = self._lesion(lesion_id).centroid_voxel
        near = idx[np.argmin(((idx - np.asarray(c)) ** 2).sum(1))]
        return (int(near[0]), int(near[1]), int(near[2]))
