"""Reviewing prompt placement in the viewer: keyboard shortcuts on the CoG layer, point colours by
review status, the dock's review line, the QA columns in the layer's features and metadata, and
"Save results".

Keys on the CoG Points layer (the active layer after a run): ``a`` accept the current slice's
prompt, ``r`` reject it ("no anomaly here": its mask is cleared), ``u`` reset it (pending again,
the method's own point), ``n`` / ``b`` the next / previous slice still pending. Dragging a point
corrects it. The work is done by :class:`~napari_mias_sam.viewer.models.live.LiveSession` and
:mod:`napari_mias_sam.viewer.models.review`; :class:`ReviewController` uses only what :class:`ReviewHost`
declares of the widget (a test checks it).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from ..data.datasets import lesion_mask
from ..core.errors import InputError, MiasSamError
from .models.layers import from_display
from .models.review import QA_KEY, QA_LAYER_KEY, STATUS_COLORS, apply_table, qa_rows, save_results
from ..data.qa_table import read_qa

__all__ = ["ReviewHost", "ReviewController", "status_colors", "STATUS_COLORS", "REVIEW_KEYS", "QA_KEY"]

#: key -> (action, what it does), bound on the CoG layer.
REVIEW_KEYS = {"a": ("accept", "accept"), "r": ("reject", "reject (no anomaly here)"), "u": ("reset", "reset"),
               "n": ("next", "next pending slice"), "b": ("previous", "previous pending slice")}
#: The QA columns shown in the CoG layer's features (besides slice, scores and status).
FEATURE_COLUMNS = ("orig_i", "orig_j", "orig_k", "displacement_mm", "in_lesion_before", "in_lesion_after",
                   "slice_dice_before", "slice_dice_after")


def status_colors(statuses) -> np.ndarray:
    """RGBA face colours of points with these review statuses."""
    from napari.utils.colormaps.standardize_color import transform_color

    sts = [str(s) for s in np.asarray(statuses, dtype=object).reshape(-1)]
    return np.asarray([transform_color(STATUS_COLORS.get(s, "red"))[0] for s in sts]).reshape(-1, 4)


def keys_help() -> str:
    return "keys on the CoG layer: " + ", ".join(f"{k} {what}" for k, (_, what) in REVIEW_KEYS.items()) + "; drag a point to correct it"


@runtime_checkable
class ReviewHost(Protocol):
    """What :class:`ReviewController` needs from the widget."""

    viewer: Any
    gt: Any
    review_info: Any
    results_folder: Any

    def report_error(self, text: str) -> None: ...

    def show_message(self, text: str, level: str = "info") -> None: ...

    def gt_lesion_labels(self, gt_layer: Any) -> Optional[tuple]: ...


class ReviewController:
    """The review of one run: keys on its CoG layer, the dock's review line, QA columns, saving."""

    def __init__(self, widget: ReviewHost, live) -> None:
        self.w = widget
        self.live = live  # the LiveController of the run
        self.session = live.session
        self.timings: list[float] = []

    # -- keys ---------------------------------------------------------------------------------------
    def bind_keys(self, layer) -> None:
        """Bind the review keys on ``layer`` (the CoG Points layer; they win over its own ``a``)."""
        for key, (action, _) in REVIEW_KEYS.items():
            layer.bind_key(key, self._key_handler(action), overwrite=True)

    def _key_handler(self, action: str):
        def handler(_layer=None):
            self.act(action)

        return handler

    def act(self, action: str) -> Optional[int]:
        """Do ``action`` (accept, reject, reset, next, previous) on the current slice; returns the
        slice acted on or moved to (None when there was nothing to do)."""
        s = self.live.current_slice()
        if action in ("next", "previous"):
            t = self.session.next_pending(s, 1 if action == "next" else -1)
            if t is None:
                self.w.show_message("every prompted slice is reviewed: save the results (Review > Save results).")
                return None
            self.live.jump_to(t)
            return t
        if self.session.result.prompts[s] is None:
            self.w.show_message(f"slice {s} has no prompt to review (no anatomy or no anomaly response).")
            return None
        stale = self.session.review(s, action)
        self.live.show_statuses()
        if stale:
            self.live.refresh(order=sorted(set(stale) | self.session.stale))
        else:
            self.update_qa()
        self.show_info()
        return s

    # -- the dock -------------------------------------------------------------------------------------
    def info_text(self) -> str:
        c = self.session.review_counts()
        s = self.live.current_slice()
        st = self.session.status(s) or "no prompt"
        return (f"reviewed {c['prompted'] - c['pending']} of {c['prompted']} prompted slices: {c['accepted']} accepted, "
                f"{c['corrected']} corrected, {c['rejected']} rejected, {c['pending']} pending. Slice {s}: {st}.\n{keys_help()}")

    def show_info(self) -> None:
        self.w.review_info.value = self.info_text()

    # -- the QA table ----------------------------------------------------------------------------------
    def gt_file_mask(self) -> Optional[np.ndarray]:
        """The picked ground truth's lesion mask in file voxel order (None without one)."""
        gt = self.w.gt.value
        mask = self.live.layers.get("mask")
        if gt is None or gt not in self.w.viewer.layers or mask is None or gt.data.shape != mask.data.shape:
            return None
        return from_display(lesion_mask(np.asarray(gt.data), self.w.gt_lesion_labels(gt)), self.session.axes)

    def rows(self) -> list[dict]:
        return qa_rows(self.session, self.gt_file_mask())

    def update_qa(self) -> list[dict]:
        """Put the QA table in the CoG layer: its columns in the features of the prompted slices'
        points, the whole table in the metadata (what File > Save Selected Layers writes)."""
        pts = self.live.layers.get("points")
        if pts is None or pts not in self.w.viewer.layers:
            return []
        rows = self.rows()
        by_slice = {r["slice"]: r for r in rows}
        feats = pts.features.copy()
        slices = feats["slice"].to_numpy() if "slice" in feats else np.zeros(0, int)
        for col in FEATURE_COLUMNS:
            feats[col] = [np.nan if by_slice[int(s)].get(col) is None else float(by_slice[int(s)][col]) for s in slices]
        feats["status"] = [self.session.status(int(s)) for s in slices]
        self.live.set_points_features(feats)
        md = dict(pts.metadata)
        info = dict(md.get("mias_sam", {}))
        info[QA_KEY] = rows
        md["mias_sam"] = info
        pts.metadata = md
        return rows

    def save(self, lesions=None, lesion_fields: Optional[dict] = None) -> Optional[dict]:
        """"Save results": the reviewed mask, the map, the points and QA CSVs into the results folder."""
        folder = self.w.results_folder.value
        if folder is None or str(folder) in ("", "."):
            self.w.report_error("choose a results folder (Review > results folder) to save the mask, the anomaly map "
                                "and the review (<stem>_qa.csv) in.")
            return None
        if self.live.busy:
            self.w.report_error("slices are still being updated; save once the live updates are done.")
            return None
        try:
            rows = [dict(r, **(lesion_fields or {})) for r in self.update_qa()]
            paths = save_results(self.session, rows, folder, lesions=lesions)
        except (MiasSamError, InputError, ValueError) as exc:
            self.w.report_error(str(exc))
            return None
        self.w.show_message(f"saved {', '.join(p.name for p in paths.values())} in {folder}")
        return paths

    def restore_opened(self) -> str:
        """Apply a review opened from a results folder or a ``<stem>_qa.csv`` (a Points layer the
        plugin's reader made) for this run's volume; returns a note for the status line."""
        ses = self.session
        for lay in self.w.viewer.layers:
            qa = lay.metadata.get(QA_LAYER_KEY) if isinstance(lay.metadata, dict) else None
            if not qa or qa.get("volume") != ses.result.volume.name:
                continue
            try:
                stale = apply_table(ses, read_qa(qa["path"]))
            except MiasSamError as exc:
                self.w.report_error(str(exc))
                return ""
            self.live.show_statuses()
            if stale:
                self.live.refresh(order=stale)
            self.show_info()
            c = ses.review_counts()
            return f"; review restored from {qa['path']} ({c['prompted'] - c['pending']} of {c['prompted']} reviewed)"
        return ""
