"""The dock's Lesions section: the run's lesions as a table (sortable by volume or score), a
Labels layer of lesion ids, a row click that jumps to the lesion's slice and centre, and the
review of whole lesions (accept; reject removes it from the mask and the saved files). With a
ground-truth layer picked, each lesion shows matched / false positive and the missed true lesions
are listed too. Thin: the work is in :mod:`.models.lesions`."""

from typing import Optional

import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, Label, PushButton, SpinBox
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..core import defaults
from ..method.lesions import CONNECTIVITIES, LesionRule
from .models.lesions import SORT_KEYS, LesionReview
from .widget_live import OUTPUT_KEY

__all__ = ["LesionPanel", "COLUMNS"]

COLUMNS = ("id", "mL", "voxels", "slices", "peak score", "mean score", "match", "review")
LESIONS_ROLE = "lesions"


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


class LesionPanel(QWidget):
    """The Lesions section of :class:`~napari_mias_sam.viewer.widget.MiasSamWidget` (``host``)."""

    def __init__(self, host) -> None:
        super().__init__()
        self.host = host
        self.model: Optional[LesionReview] = None
        self.layer = None
        self._rows: list = []
        self.connectivity = ComboBox(choices=list(CONNECTIVITIES), value=defaults.LESION_CONNECTIVITY, label="connectivity",
                                     tooltip="voxels sharing a face (6), also an edge (18) or also a corner (26) join one lesion")
        self.min_voxels = SpinBox(value=defaults.MIN_LESION_VOXELS, min=1, max=10_000_000, label="min voxels",
                                  tooltip="smaller components stay in the mask but are not lesions")
        self.sort = ComboBox(choices=list(SORT_KEYS), value="volume", label="sort by")
        self.refresh_btn = PushButton(text="Refresh lesions")
        self.accept_btn = PushButton(text="Accept lesion")
        self.reject_btn = PushButton(text="Reject lesion",
                                     tooltip="remove the selected lesion from the mask, the table and the saved files")
        self.info = Label(value="lesions: press Refresh lesions after a run")
        self.info.native.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(160)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        for row, labels in (((self.connectivity, self.min_voxels), True), ((self.sort,), True),
                            ((self.refresh_btn, self.accept_btn, self.reject_btn), False)):
            cont = Container(widgets=list(row), layout="horizontal", labels=labels)
            cont.native.layout().setContentsMargins(0, 0, 0, 0)
            lay.addWidget(cont.native)
        lay.addWidget(self.info.native)
        lay.addWidget(self.table)
        self.refresh_btn.changed.connect(self.refresh)
        self.sort.changed.connect(self._fill)
        self.accept_btn.changed.connect(lambda *_: self.review_selected("accept"))
        self.reject_btn.changed.connect(lambda *_: self.review_selected("reject"))
        self.table.cellClicked.connect(lambda r, _c: self.jump(r))

    # -- computing ---------------------------------------------------------------------------------
    def refresh(self, *_args) -> bool:
        """Recompute the run's lesions (with the picked ground truth's matches) and show them."""
        live = self.host.live
        if live is None:
            self.host.report_error("no lesions yet: run MIAS-SAM on an image layer first.")
            return False
        if live.busy:
            self.host.report_error("slices are still being updated; refresh the lesions once the live updates are done.")
            return False
        if self.model is None or self.model.session is not live.session:
            self.model = LesionReview(live.session)
        rule = LesionRule(connectivity=int(self.connectivity.value), min_voxels=int(self.min_voxels.value))
        self.model.refresh(live.review.gt_file_mask(), rule)
        self._show_labels()
        self._fill()
        return True

    def lesion_set(self):
        """What Save results writes: the lesions refreshed now (None before any refresh: the default)."""
        if self.model is None or self.host.live is None or self.model.session is not self.host.live.session:
            return None
        self.refresh()
        return self.model.lesions

    # -- the table ---------------------------------------------------------------------------------
    def _fill(self, *_args) -> None:
        self._rows = self.model.rows(self.sort.value) if self.model is not None else []
        self.table.setRowCount(len(self._rows))
        for i, r in enumerate(self._rows):
            cells = (("" if r["kind"] == "lesion" else "true ") + str(r["id"]), _num(r["volume_ml"], ".3f"), str(r["voxels"]),
                     r["slices"], _num(r["peak_score"], ".2f"), _num(r["mean_score"], ".2f"), r["match"], r["review"])
            for j, text in enumerate(cells):
                self.table.setItem(i, j, QTableWidgetItem(text))
        self.info.value = self.model.summary() if self.model is not None else "lesions: press Refresh lesions after a run"

    def selected_row(self) -> Optional[dict]:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        return self._rows[rows[0].row()] if rows else None

    def jump(self, row: int) -> None:
        """Move the viewer to row ``row``'s lesion: its centre slice, and the camera onto its centre."""
        if not 0 <= row < len(self._rows) or self.host.live is None:
            return
        self.table.selectRow(row)
        source = self.host.live.source
        world = np.asarray(source.data_to_world(self._rows[row]["target"]), dtype=float)
        viewer = self.host.viewer
        off = viewer.dims.ndim - len(world)
        for ax in viewer.dims.not_displayed:
            if ax - off >= 0:
                viewer.dims.set_point(ax, world[ax - off])
        shown = [ax - off for ax in viewer.dims.displayed if ax - off >= 0]
        centre = list(viewer.camera.center)[-len(shown):]
        for n, ax in enumerate(shown):
            centre[n] = world[ax]
        viewer.camera.center = tuple(centre)

    # -- review --------------------------------------------------------------------------------------
    def review_selected(self, action: str) -> Optional[int]:
        row = self.selected_row()
        if row is None or row["kind"] != "lesion":
            self.host.report_error("select a lesion of the table first (a predicted lesion, not a missed true one).")
            return None
        lid = int(row["id"])
        if action == "accept":
            self.model.accept(lid)
        else:
            gone = self.model.reject(lid)
            mask = self.host.live.layers.get("mask")
            if mask is not None and mask.data.shape == gone.shape:
                mask.data[gone] = 0
                mask.refresh()
                self.host.live.update_compare(full=True)  # the Dice counts see the removed voxels
            if self.layer is not None:
                self.layer.data = self.model.labels_display()
        self._fill()
        self.host.show_message(f"lesion {lid} {'accepted' if action == 'accept' else 'rejected: removed from the mask'}")
        return lid

    def _show_labels(self) -> None:
        """The lesion ids as a Labels layer over the mask (same geometry), ids in its features."""
        live = self.host.live
        viewer = self.host.viewer
        data = self.model.labels_display()
        les = self.model.lesions.lesions
        feats = pd.DataFrame({"index": [0] + [x.id for x in les], "volume_ml": [0.0] + [round(x.volume_ml, 4) for x in les],
                              "match": [""] + [x.match for x in les]})
        if self.layer is not None and self.layer in viewer.layers and self.layer.data.shape == data.shape:
            self.layer.data = data
            self.layer.features = feats
            return
        if self.layer is not None and self.layer in viewer.layers:
            viewer.layers.remove(self.layer)
        s = live.source
        meta = {**dict(live.layers["mask"].metadata)}
        meta[OUTPUT_KEY] = {**meta.get(OUTPUT_KEY, {}), "layer": LESIONS_ROLE, "lesion_rule": self.model.rule.describe()}
        self.layer = viewer.add_labels(data, name=f"{s.name} lesions", features=feats, metadata=meta, opacity=0.6,
                                       affine=s.affine.affine_matrix, scale=s.scale, translate=s.translate, rotate=s.rotate,
                                       shear=s.shear)
        mask = live.layers.get("mask")
        if mask is not None and mask in viewer.layers:
            mask.visible = False  # the lesions layer shows the same voxels, each lesion in its own colour
