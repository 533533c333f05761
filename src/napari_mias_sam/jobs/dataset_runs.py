"""Labelled datasets as bank sources and test cases: the lesion-free slices of BraTS / LiTS cases
for a memory bank, one modality of a case with its paired ground truth, LiTS's liver ROI.

The bank's manifest records where every slice came from (``sources``: path and slice indices)
and how they were chosen (``dataset``: layout, modality, margin, ROI, subjects), so a test set
can be checked against it (:func:`check_disjoint`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import defaults
from ..bank import MemoryBank, SliceGroup
from ..data.datasets import (
    Case,
    DatasetKind,
    LesionLabels,
    canonical_modality,
    case_for_file,
    check_case,
    check_lesion_labels,
    check_margin,
    dataset_kind,
    find_cases,
    label_values,
    lesion_description,
    lesion_mask,
    normal_slices,
    parse_lesion_labels,
    select_cases,
)
from ..core.errors import InputError
from ..data.sequences import case_sequence_files, parse_sequences
from ..data.volumes import Volume, load_labels, load_volume
from ..method.preprocess import resolve_axis, Preprocessing
from ..pipeline.frames import volume_frames

__all__ = [
    "CaseData",
    "ROIS",
    "load_case",
    "apply_roi",
    "dataset_groups",
    "prepare_dataset",
    "bank_subjects",
    "check_disjoint",
    "lesion_for",
    "SegmentInput",
    "segment_inputs",
    "units_from_dataset",
    "bank_sequences",
    "with_sequences",
    "sequences_for_bank",
]

ROIS = ("liver",)


@dataclass
class CaseData:
    """One modality of a case, its label volume (or None) and the dataset's lesion labels."""

    case: Case
    modality: str
    image: Volume
    labels: Volume | None
    roi: str | None = None


def apply_roi(image: Volume, labels: Volume, roi: str, kind: DatasetKind) -> Volume:
    """``image`` with every voxel outside the ROI labels set below the intensity range (it then
    normalises to 0 and slices without the ROI count as empty), as BMAD's Liver CT masks to the
    liver. The ROI comes from the labels, as in BMAD: say so when reporting."""
    if roi not in kind.rois:
        raise InputError(f"--roi {roi}: the {kind.title} layout has no such region (it has: {', '.join(kind.rois) or 'none'}).")
    inside = np.isin(labels.data, np.asarray(kind.rois[roi]))
    if not inside.any():
        raise InputError(f"{labels.path}: holds no {roi} labels ({','.join(map(str, kind.rois[roi]))}); "
                         f"--roi {roi} would leave nothing of {image.path}.")
    fill = min(float(image.data.min()), -1024.0)
    data = np.where(inside, image.data, np.float32(fill)).astype(np.float32)
    return Volume(data=data, affine=image.affine, header=image.header, path=image.path, meta={**image.meta, "roi": roi})


def load_case(case: Case, modality: str | None = None, *, roi: str | None = None, need_labels: bool = False) -> CaseData:
    """Read one modality of ``case`` (default: the layout's) with its labels on the same grid;
    ``modality`` naming three sequences (``"flair,t1ce,t2"``) reads them as the image's channels."""
    seqs = parse_sequences(modality or case.info.default_modality)
    if len(seqs) > 1:
        if roi:
            raise InputError("--roi masks one CT image per case; it does not combine with several sequences.")
        image = with_sequences(case, seqs)
        labels = load_labels(case.seg, like=image) if case.seg is not None else None
        if labels is None and need_labels:
            raise InputError(f"{case.folder}: case {case.subject} has no segmentation file; its lesion-free slices cannot "
                             "be found without it.")
        return CaseData(case, ",".join(seqs), image, labels, None)
    mod = seqs[0]
    path = case.image(mod)
    check_case(case, [mod])
    if case.seg is None and (need_labels or roi):
        raise InputError(f"{case.folder}: case {case.subject} has no segmentation file; "
                         + ("--roi needs it." if roi else "its lesion-free slices cannot be found without it."))
    image = load_volume(path)
    labels = load_labels(case.seg, like=image) if case.seg is not None else None
    if roi:
        image = apply_roi(image, labels, roi, case.info)
    return CaseData(case, mod, image, labels, roi)


def dataset_groups(cases: list[Case], modality: str, prep: Preprocessing, *, axis: int | str = defaults.SLICE_AXIS,
                   margin: int = defaults.DATASET_MARGIN, roi: str | None = None, encoding: str = "standard") -> list[SliceGroup]:
    """One :class:`SliceGroup` per case: its lesion-free slices (every label normal, more than
    ``margin`` slices from any other) that hold anatomy (inside the ROI when one is given)."""
    groups = []
    first = parse_sequences(modality)[0]
    for case in cases:
        path = case.image(first)
        import nibabel as nib

        shape = nib.load(str(path)).shape
        ax_guess = resolve_axis(axis) if not isinstance(axis, str) or axis.isdigit() else resolve_axis(axis, nib.load(str(path)).affine)

        def load(case: Case = case) -> tuple[torch.Tensor, int, list[int], dict]:
            cd = load_case(case, modality, roi=roi, need_labels=True)
            ax = resolve_axis(axis, cd.image.affine)
            data = cd.image.data if cd.image.channels is None else cd.image.channels
            frames, fg = volume_frames(data, prep, ax, source=str(cd.image.path), encoding=encoding)
            normal = normal_slices(cd.labels.data, ax, margin=margin, normal=case.info.normal)
            keep = np.flatnonzero(normal & fg)
            lesion = normal_slices(cd.labels.data, ax, margin=0, normal=case.info.normal)
            extra = {"path": str(cd.image.path), "labels": str(case.seg), "subject": case.subject,
                     "skipped_empty": int((normal & ~fg).sum()), "lesion_slices": int((~lesion).sum()),
                     "margin_slices": int((lesion & ~normal).sum())}
            return frames[torch.from_numpy(keep)], len(fg) - len(keep), keep.tolist(), extra

        groups.append(SliceGroup(name=path.name, n=int(shape[ax_guess]), load=load, path=str(path)))
    return groups


def prepare_dataset(root: str | os.PathLike, *, modality: str | None = None, subjects=None, exclude=None,
                    roi: str | None = None, margin: int | None = None,
                    axis: int | str = defaults.SLICE_AXIS) -> tuple[list[Case], DatasetKind, str]:
    """The cases of ``root`` chosen by the subject lists, their layout and the canonical modality;
    every case is checked (files present, one grid) before any work. With ``margin``: the margin
    is checked, and refused when it leaves no slice of the cases (their labels are read for that)."""
    if margin is not None:
        check_margin(margin)  # before anything is read or printed
    cases = select_cases(find_cases(root), subjects=subjects, exclude=exclude)
    kind = dataset_kind(cases)
    seqs = parse_sequences(modality or kind.default_modality)
    mod = ",".join(seqs)
    if roi is not None and roi not in kind.rois:
        raise InputError(f"--roi {roi}: {root} is a {kind.title} dataset, which has no {roi} labels.")
    if len(seqs) > 1 and roi is not None:
        raise InputError("--roi masks one CT image per case; it does not combine with several sequences.")
    for c in cases:
        if len(seqs) > 1:
            case_sequence_files(c, seqs)  # a missing sequence: one line naming its file
        check_case(c, list(seqs))
        if c.seg is None:
            raise InputError(f"{c.folder}: case {c.subject} has no segmentation file; a bank from lesion-free slices "
                             "needs the labels (leave the case out with --exclude-subjects).")
    if margin is not None:
        _check_margin_leaves_slices(cases, margin, axis)
    return cases, kind, mod


@functools.lru_cache(maxsize=4096)
def _abnormal_slices(seg: str, stamp: tuple, axis: int | str, normal: tuple[int, ...]) -> np.ndarray:
    """Per slice along ``axis``: holds a label that is not normal tissue (``stamp``: the file's
    size and time, so a changed file is read again)."""
    import nibabel as nib

    img = nib.load(seg)
    ax = resolve_axis(axis, img.affine)
    lab = np.moveaxis(np.asarray(img.dataobj), ax, 0)
    return (~np.isin(lab, np.asarray(normal))).reshape(lab.shape[0], -1).any(axis=1)


def _check_margin_leaves_slices(cases: list[Case], margin: int, axis: int | str) -> None:
    """Refuse a margin that excludes every slice of every case, with the counts that show it."""
    total = lesion = kept = 0
    for c in cases:
        st = c.seg.stat()
        abnormal = _abnormal_slices(str(c.seg), (st.st_size, st.st_mtime_ns), axis, tuple(c.info.normal))
        free = normal_slices(abnormal[:, None], 0, margin=margin, normal=(False,))
        total, lesion, kept = total + len(abnormal), lesion + int(abnormal.sum()), kept + int(free.sum())
    if kept == 0:
        raise InputError(f"--margin {margin} leaves no slice: of the {total} slices of {len(cases)} case{'s' if len(cases) > 1 else ''}, "
                         f"{lesion} hold lesion labels and the other {total - lesion} lie within {margin} slices of one; "
                         "use a smaller --margin (default 2), or add cases without lesions.")


def bank_subjects(bank: MemoryBank) -> set[str]:
    """Subjects whose slices are in the bank (from a dataset bank's manifest)."""
    ds = bank.manifest.get("dataset") or {}
    return set(ds.get("subjects") or [])


def check_disjoint(bank: MemoryBank, cases: list[Case]) -> None:
    """Refuse test cases whose subject or image file went into the bank."""
    in_bank = bank_subjects(bank)
    paths = {str(Path(s["path"]).resolve()) for s in bank.manifest.get("sources", []) if s.get("path")}
    for c in cases:
        files = {str(Path(p).resolve()) for p in c.images.values()}
        if c.subject in in_bank or files & paths:
            raise InputError(f"subject {c.subject} is both in the bank {bank.path or ''} and in the test set; "
                             "keep test subjects out of the bank (build-bank --exclude-subjects FILE) or leave it out "
                             "of the test list.")


def lesion_for(case: Case | None, override: str | None = None) -> LesionLabels:
    """The lesion labels to score ``case`` with: ``override`` (text such as ``"1,2,4"`` or
    ``"nonzero"``, from ``--lesion-labels`` or the widget) when given, else the layout's."""
    if override is not None and str(override).strip() != "":
        return parse_lesion_labels(override)
    return case.info.lesion if case is not None else None


@dataclass
class SegmentInput:
    """One volume to segment: the image file, its ground truth (paired from a case folder or a
    LiTS pair, or given), the lesion labels to score it with and the ROI the bank asks for."""

    image: Path
    gt: Path | None = None
    case: Case | None = None
    lesion: LesionLabels = None
    lesion_source: str = "default: any non-zero label"
    roi: str | None = None
    sequences: tuple[str, ...] | None = None  # a multi-sequence bank's: read from the case as channels

    def load(self) -> tuple[Volume, Volume | None]:
        """The image, as in its file (with the case's other sequences as channels when the bank
        takes several), and its label volume (a run masks the image to the bank's ROI:
        :func:`~napari_mias_sam.jobs.run.roi_for_bank`)."""
        image = with_sequences(self.case, self.sequences) if self.sequences else load_volume(self.image)
        labels = load_labels(self.gt, like=image) if self.gt is not None else None
        return image, labels


def _case_modality(case: Case, modality: str | None, dataset: dict) -> str:
    if modality:
        return canonical_modality(modality)
    if dataset.get("modality"):
        return dataset["modality"]
    if len(case.images) == 1:
        return next(iter(case.images))
    raise InputError(f"{case.folder}: the bank does not record a modality (it was not built from a dataset): "
                     f"choose one of {', '.join(sorted(case.images))} with --modality.")


def segment_inputs(volumes: list[Path], gts: list[Path] | None, manifest: dict, *, modality: str | None = None,
                   lesion_labels: str | None = None) -> list[SegmentInput]:
    """Resolve ``segment``'s inputs: NIfTI files, BraTS case folders (the bank's modality, or
    ``modality``) and LiTS files, each paired with its segmentation unless ``gts`` are given."""
    dataset = manifest.get("dataset") or {}
    roi = dataset.get("roi")
    seqs = bank_sequences(manifest)
    if seqs and modality and parse_sequences(modality) != seqs:
        raise InputError(f"--modality {modality}: the bank was built from the sequences {','.join(seqs)}; runs with it "
                         "read the same ones (drop --modality).")
    out = []
    for n, v in enumerate(volumes):
        v = Path(v)
        gt = Path(gts[n]) if gts else None
        if v.is_dir():
            cases = find_cases(v)
            if len(cases) != 1:
                raise InputError(f"{v}: holds {len(cases)} cases; give one case folder per volume, or evaluate the "
                                 "whole dataset with 'mias-sam evaluate --dataset'.")
            case = cases[0]
            mod = seqs[0] if seqs else _case_modality(case, modality, dataset)
            if seqs:
                case_sequence_files(case, seqs)
            image = case.image(mod)
            check_case(case, list(seqs or [mod]), seg=gt is None)
        else:
            case, image = case_for_file(v), v
            if modality and case is not None and not seqs:
                raise InputError(f"{v}: --modality applies to case folders; give the folder {case.folder} or drop --modality.")
            if seqs:
                if case is None:
                    raise InputError(f"{v}: the bank was built from {len(seqs)} sequences of BraTS cases ({', '.join(seqs)}); "
                                     "give the case folder (or a file of it, named as the release names it).")
                case_sequence_files(case, seqs)
        if gt is None and case is not None:
            gt = case.seg
        if roi:
            if case is None or roi not in case.info.rois:
                raise InputError(f"{v}: the bank was built with --roi {roi} ({dataset.get('layout')}); give a "
                                 f"{dataset.get('layout')} case so the {roi} can be masked the same way.")
            if gt is None:
                raise InputError(f"{v}: the bank was built with --roi {roi}, which needs this volume's labels; "
                                 "its segmentation file is missing.")
        if lesion_labels is not None and str(lesion_labels).strip():
            source = f"--lesion-labels {lesion_labels}"
        elif case is not None:
            source = f"{case.info.title} default"
        else:
            source = "default: any non-zero label"
        out.append(SegmentInput(image=image, gt=gt, case=case, lesion=lesion_for(case, lesion_labels),
                                lesion_source=source, roi=roi if roi and case is not None else None, sequences=seqs))
    if lesion_labels is not None and str(lesion_labels).strip():
        _check_given_labels(lesion_labels, {j.gt: j.lesion for j in out if j.gt is not None})
    return out


def _check_given_labels(text: str, gts: dict[Path, LesionLabels]) -> None:
    """``--lesion-labels`` against the ground truths it scores (their label values read first)."""
    if not gts:
        raise InputError(f"--lesion-labels {text}: applies to ground truths, and none is given; pass --gt (one per volume) "
                         "or case folders whose seg file lies beside the images.")
    lesion = next(iter(gts.values()))
    check_lesion_labels(lesion, {p.name: label_values(p) for p in gts}, source=f"--lesion-labels {text}")


def units_from_dataset(root: str | os.PathLike, banks: list[MemoryBank], *, subjects=None, exclude=None,
                       modality: str | None = None, lesion_labels: str | None = None) -> tuple[list, dict]:
    """Evaluation units (:class:`~napari_mias_sam.evaluation.sweep.TestUnit`) for the cases of a dataset
    root, scored with the layout's lesion labels (or ``lesion_labels``), preprocessed and masked
    (ROI) as the first bank was. Refuses test subjects that are in a bank. Returns the units and
    a description of the test set for the report."""
    from ..evaluation.sweep import unit_from_volume

    cases = select_cases(find_cases(root), subjects=subjects, exclude=exclude)
    for bank in banks:
        check_disjoint(bank, cases)
    kind = dataset_kind(cases)
    ds = banks[0].manifest.get("dataset") or {}
    seqs = bank_sequences(banks[0].manifest)
    if seqs and modality and parse_sequences(modality) != seqs:
        raise InputError(f"--modality {modality}: the bank was built from the sequences {','.join(seqs)}; drop --modality.")
    mod = ",".join(seqs) if seqs else canonical_modality(modality or ds.get("modality") or kind.default_modality)
    roi = ds.get("roi") if ds.get("roi") in kind.rois else None
    if ds.get("roi") and roi is None:
        raise InputError(f"{root}: the bank was built with --roi {ds['roi']} ({ds.get('layout')}) but this is a {kind.title} dataset.")
    for c in cases:  # every file checked before the first is read
        if seqs:
            case_sequence_files(c, seqs)
        check_case(c, list(parse_sequences(mod)))
        if c.seg is None:
            raise InputError(f"{c.folder}: case {c.subject} has no segmentation file; evaluation needs the ground truth "
                             "(leave the case out with --exclude-subjects).")
    if lesion_labels is not None and str(lesion_labels).strip():
        _check_given_labels(lesion_labels, {c.seg: lesion_for(c, lesion_labels) for c in cases})
    units, counted = [], set()
    lesion = lesion_for(cases[0], lesion_labels)
    for c in cases:
        cd = load_case(c, mod, roi=roi, need_labels=True)
        lesion = lesion_for(c, lesion_labels)
        counted.update(int(v) for v in np.unique(cd.labels.data[lesion_mask(cd.labels.data, lesion)]))
        units.append(unit_from_volume(cd.image, lesion_mask(cd.labels.data, lesion), banks[0], name=c.subject))
    source = f"--lesion-labels {lesion_labels}" if lesion_labels else f"{kind.title} default"
    info = {"root": str(root), "layout": kind.name, "modality": mod, "roi": roi, "subjects": [c.subject for c in cases],
            "lesion_labels": {**lesion_description(lesion, source=source), "counted": sorted(counted)}}
    return units, info


# -- several sequences of a case in the encoder's channels --------------------------------------------
def bank_sequences(manifest: dict) -> tuple[str, ...] | None:
    """The sequences a bank put into the encoder's channels (None: one image per slice)."""
    seqs = (manifest.get("dataset") or {}).get("sequences")
    return tuple(seqs) if seqs and len(seqs) > 1 else None


def with_sequences(case: Case, sequences) -> Volume:
    """The case's ``sequences`` as one :class:`Volume`: the first as ``data`` (geometry), all of
    them as ``channels``. A missing file or one off the case's grid: one line naming it."""
    files = case_sequence_files(case, sequences)
    check_case(case, list(sequences), seg=False)
    vols = [load_volume(f) for f in files]
    first = vols[0]
    return Volume(data=first.data, affine=first.affine, header=first.header, path=first.path,
                  meta={**first.meta, "sequences": list(sequences)}, channels=np.stack([v.data for v in vols]))


def sequences_for_bank(volume: Volume, manifest: dict) -> Volume:
    """``volume`` with the other sequences the bank takes, read from its BraTS case folder (what the
    widget runs); unchanged for a one-image bank."""
    seqs = bank_sequences(manifest)
    if seqs is None:
        return volume
    case = case_for_file(volume.path) if volume.path is not None else None
    if case is None:
        raise InputError(f"the bank was built from {len(seqs)} sequences of BraTS cases ({', '.join(seqs)}): open a volume "
                         "of a BraTS case folder (named as the release names it), so its other sequences can be read.")
    full = with_sequences(case, seqs)
    if full.data.shape != volume.data.shape:
        raise InputError(f"{case.folder}: its sequences are {full.data.shape} but the image is {volume.data.shape}; "
                         "open the case's own image.")
    return Volume(data=volume.data, affine=volume.affine, header=volume.header, path=volume.path,
                  meta={**volume.meta, "sequences": list(seqs)}, channels=full.channels)
