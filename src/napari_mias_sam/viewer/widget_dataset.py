"""The labelled-dataset part of the MIAS-SAM widget: a memory bank from the lesion-free slices of a
BraTS / LiTS folder (modality, margin, subject lists, LiTS's liver ROI), in the background with
progress and cancel; the lesion labels a ground-truth layer is scored with; CT display windows.

Thin: the work is :func:`napari_mias_sam.jobs.bank_builds.build_bank_from_dataset`, the same call
as ``mias-sam build-bank ROOT --modality ... --margin ...``.
"""

from typing import Optional

import napari
from magicgui.widgets import ComboBox, FileEdit, LineEdit, PushButton, SpinBox

from ..data.datasets import dataset_kind, find_cases, looks_like_dataset, parse_lesion_labels
from ..core import defaults
from ..core.errors import InputError, MiasSamError
from .models.layers import CT_WINDOWS
from .widget_bank import path_or_none

__all__ = ["DatasetMixin", "MODALITY_CHOICES", "modality_choices"]

MODALITY_CHOICES = ("auto", "flair", "t1", "t1ce", "t2", "ct")


def modality_choices(cases) -> tuple:
    """What the cases offer: auto, each sequence every case has, and each three of them (FLAIR
    first when present) for a multi-sequence bank."""
    from itertools import combinations

    common = set.intersection(*(set(c.images) for c in cases)) if cases else set()
    order = [m for m in ("flair", "t1ce", "t2", "t1", "ct") if m in common]
    threes = [",".join(t) for t in combinations(order, 3)]
    return ("auto", *order, *threes)


class DatasetMixin:
    """Dataset controls of :class:`~napari_mias_sam.viewer.widget.MiasSamWidget`."""

    def _make_dataset_controls(self) -> list:
        self.dataset_root = FileEdit(mode="d", label="or a dataset",
                                     tooltip="a BraTS root or case folder, or a LiTS folder: the bank takes its lesion-free slices")
        self.ds_modality = ComboBox(choices=MODALITY_CHOICES, value="auto", label="modality",
                                    tooltip="auto: flair for BraTS (= t2f), ct for LiTS; three sequences of a BraTS case "
                                            "(e.g. flair,t1ce,t2) fill the encoder's three channels")
        self.ds_margin = SpinBox(value=defaults.DATASET_MARGIN, min=0, max=50, label="margin (slices)",
                                 tooltip="keep only slices more than this many slices from any labelled slice")
        self.ds_subjects = FileEdit(mode="r", filter="*.txt *.csv *", label="subjects file",
                                    tooltip="optional: the subjects to use, one per line (default: all)")
        self.ds_exclude = FileEdit(mode="r", filter="*.txt *.csv *", label="exclude subjects",
                                   tooltip="optional: subjects to leave out, one per line (e.g. the test split)")
        self.ds_roi = ComboBox(choices=("none", "liver"), value="none", label="ROI",
                               tooltip="LiTS: mask every slice to the liver labels (1, 2), as BMAD's Liver CT")
        self.build_ds_btn = PushButton(text="Build bank from dataset")
        self.dataset_root.changed.connect(self._on_dataset_root)
        self.build_ds_btn.changed.connect(self.build_bank_from_dataset)
        return [self.dataset_root, self.ds_modality, self.ds_margin, self.ds_subjects, self.ds_exclude, self.ds_roi,
                self.build_ds_btn]

    def _make_compare_controls(self) -> list:
        self.lesion_labels = LineEdit(value="", label="lesion labels",
                                      tooltip="label values that count as the lesion, e.g. 1,2,4 (blank: any non-zero; "
                                              "LiTS segmentations open with 2)")
        self.ct_window = ComboBox(choices=("-",) + tuple(CT_WINDOWS), value="-", label="CT window",
                                  tooltip="display window of the image layer: abdomen [-200, 250] HU, liver [-100, 200] HU")
        self.lesion_labels.changed.connect(self._on_lesion_labels)
        self.ct_window.changed.connect(self._on_ct_window)
        return [self.lesion_labels]

    # -- dataset bank -------------------------------------------------------------------------------
    def _on_dataset_root(self, *_args) -> None:
        root = path_or_none(self.dataset_root.value)
        if root is None or not looks_like_dataset(root):
            return
        try:
            cases = find_cases(root)
            kind = dataset_kind(cases)  # mixed BraTS releases are refused, naming the cases of each
        except MiasSamError as exc:
            self.status.value = f"dataset: {exc}"
            return
        self.preprocess.value = kind.preprocess
        self.ds_modality.choices = modality_choices(cases)
        self.status.value = f"dataset: {kind.title}, {len(cases)} cases"

    def build_bank_from_dataset(self):
        """Build the bank from the dataset folder's lesion-free slices in the background."""
        try:
            root = path_or_none(self.dataset_root.value)
            if root is None:
                raise InputError("choose a dataset folder (a BraTS root or case folder, or a LiTS folder).")
            if not looks_like_dataset(root):
                raise InputError(f"{root}: holds no BraTS case folders or LiTS volume-N/segmentation-N files.")
            key = self.selected_backbone_key()
        except MiasSamError as exc:
            self.report_error(str(exc))
            return None
        from ..jobs.bank_builds import build_bank_from_dataset

        mod = None if self.ds_modality.value == "auto" else str(self.ds_modality.value)
        subjects, exclude = path_or_none(self.ds_subjects.value), path_or_none(self.ds_exclude.value)
        roi = None if self.ds_roi.value == "none" else str(self.ds_roi.value)
        opts = dict(modality=mod, margin=int(self.ds_margin.value), subjects=subjects, exclude=exclude, roi=roi,
                    preprocess=str(self.preprocess.value), layout=self.layout_choice.value, batch_size=int(self.batch_size.value))

        def job(progress, cancelled):
            bb = self.get_backbone(key, progress)
            bank = build_bank_from_dataset(root, bb, progress=progress, cancelled=cancelled, **opts)
            return bb, key, bank

        self.status.value = f"building a bank from the lesion-free slices of {root.name}..."
        return self.start_job(job, self._bank_built)

    # -- lesion labels of the ground truth ------------------------------------------------------------
    def gt_lesion_labels(self, gt_layer) -> Optional[tuple]:
        """The lesion labels a ground-truth layer is scored with (its metadata; None: any non-zero)."""
        value = (getattr(gt_layer, "metadata", None) or {}).get("lesion_labels")
        return None if not value else tuple(int(v) for v in value)

    def _on_gt_selected(self, *_args) -> None:
        gt = self.gt.value
        labels = self.gt_lesion_labels(gt) if gt is not None else None
        with self.lesion_labels.changed.blocked():
            self.lesion_labels.value = "" if labels is None else ",".join(map(str, labels))

    def _on_lesion_labels(self, *_args) -> None:
        gt = self.gt.value
        try:
            labels = parse_lesion_labels(self.lesion_labels.value)
        except InputError as exc:
            self.report_error(str(exc))
            return
        if gt is not None:
            gt.metadata = {**gt.metadata, "lesion_labels": None if labels is None else list(labels)}
        self._on_compare_changed()

    def _on_ct_window(self, *_args) -> None:
        layer = self.image.value
        if self.ct_window.value == "-" or not isinstance(layer, napari.layers.Image):
            return
        layer.contrast_limits = list(CT_WINDOWS[self.ct_window.value])
        layer.metadata = {**layer.metadata, "display_window": f"ct-{self.ct_window.value}"}
