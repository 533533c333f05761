"""Users' datasets, recognised by their file names: BraTS case folders, LiTS volume/segmentation
pairs, and root folders of either; the lesion labels of each; subject lists; lesion-free slices.

Pure (nibabel headers and numpy only): the CLI, the widget and the napari reader all call it.

Layouts (names as the releases ship them, see ``docs/datasets.md``):

* BraTS 2021 (and 2020's ``BraTS20_Training_001_*``): a case folder ``BraTS2021_00000/`` holding
  ``BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz``; labels 0/1/2/4.
* BraTS 2023 and later: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1c,t1n,t2w,seg}.nii.gz``
  (also MEN, MET, PED, SSA); labels 0-3. One vocabulary for both: flair = t2f, t1ce = t1c,
  t1 = t1n, t2 = t2w (the 2021 names are the canonical ones).
* LiTS: flat ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]`` (possibly in batch folders);
  1 = liver, 2 = tumour.

Lesion labels: which label values count as the anomaly. BraTS: the whole tumour (any non-zero);
LiTS: 2 (the tumour; the liver is normal tissue); any other file: non-zero. ``None`` stands for
"any non-zero label"; a tuple lists the values (:mod:`.lesion_labels`: parsing, masks, and the
check of user-given labels against the ground truths).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..core import defaults
from ..core.errors import InputError
from .lesion_labels import (  # noqa: F401  (re-exported: the lesion labels were defined here first)
    LesionLabels,
    LesionLabelsWarning,
    check_lesion_labels,
    label_values,
    lesion_description,
    lesion_mask,
    parse_lesion_labels,
)

__all__ = [
    "MODALITIES",
    "MODALITY_ALIASES",
    "DatasetKind",
    "KINDS",
    "Case",
    "LesionLabels",
    "canonical_modality",
    "parse_lesion_labels",
    "lesion_mask",
    "lesion_description",
    "LesionLabelsWarning",
    "label_values",
    "check_lesion_labels",
    "read_case_folder",
    "lits_cases",
    "find_cases",
    "looks_like_dataset",
    "case_for_file",
    "check_case",
    "read_subject_list",
    "select_cases",
    "dataset_kind",
    "check_margin",
    "normal_slices",
]

#: Canonical modality names (BraTS 2021's) and CT.
MODALITIES = ("flair", "t1", "t1ce", "t2", "ct")
#: Every accepted spelling -> canonical name (BraTS 2023+ names included).
MODALITY_ALIASES = {
    "flair": "flair", "t2f": "flair", "t2-flair": "flair",
    "t1": "t1", "t1n": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "ct": "ct",
}


_NIFTI = r"\.nii(?:\.gz)?$"
_BRATS_FILE = re.compile(r"^(?P<case>brats.+?)[_-](?P<kind>flair|t1ce|t1c|t1n|t1|t2f|t2w|t2|seg)" + _NIFTI, re.IGNORECASE)
_LITS_VOLUME = re.compile(r"^volume-(?P<n>\d+)" + _NIFTI, re.IGNORECASE)
_LITS_SEG = re.compile(r"^segmentation-(?P<n>\d+)" + _NIFTI, re.IGNORECASE)
_NEW_BRATS_NAMES = {"t2f", "t1c", "t1n", "t2w"}


@dataclass(frozen=True)
class DatasetKind:
    """What a layout means: its default lesion labels, the labels that are normal tissue (a bank
    takes only slices holding nothing else), regions of interest, the default modality and
    intensity preset."""

    name: str
    title: str
    lesion: LesionLabels
    normal: tuple[int, ...]
    rois: dict = field(default_factory=dict)
    default_modality: str = "flair"
    preprocess: str = defaults.PREPROCESS


KINDS: dict[str, DatasetKind] = {
    "brats2021": DatasetKind("brats2021", "BraTS 2021 (labels 0/1/2/4)", None, (0,)),
    "brats2023": DatasetKind("brats2023", "BraTS 2023+ (labels 0-3)", None, (0,)),
    "lits": DatasetKind("lits", "LiTS (1 liver, 2 tumour)", (2,), (0, 1), {"liver": (1, 2)}, "ct", "ct-abdomen"),
    "nifti": DatasetKind("nifti", "NIfTI files", None, (0,)),
}


@dataclass(frozen=True)
class Case:
    """One subject: its image files by canonical modality and its segmentation (or None)."""

    subject: str
    kind: str
    folder: Path
    images: dict
    seg: Path | None = None
    aliases: tuple[str, ...] = ()

    @property
    def info(self) -> DatasetKind:
        return KINDS[self.kind]

    def image(self, modality: str) -> Path:
        """The file of ``modality`` (any spelling); a one-line error naming what the case has."""
        mod = canonical_modality(modality)
        if mod not in self.images:
            have = ", ".join(sorted(self.images)) or "no images"
            raise InputError(f"{self.folder}: case {self.subject} has no {modality} image (it has: {have}); "
                             "choose one of those with --modality.")
        return self.images[mod]

    def names(self) -> set[str]:
        return {self.subject, *self.aliases}


def canonical_modality(name: str) -> str:
    key = str(name).strip().lower()
    if key not in MODALITY_ALIASES:
        raise InputError(f"unknown modality {name!r}; choose flair (= t2f), t1 (= t1n), t1ce (= t1c), t2 (= t2w) or ct.")
    return MODALITY_ALIASES[key]


# -- recognising layouts ----------------------------------------------------------------------------
def _nifti_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and re.search(_NIFTI, p.name, re.IGNORECASE))
    except OSError as exc:
        raise InputError(f"{folder}: cannot list this folder ({exc}).") from exc


def read_case_folder(folder: str | os.PathLike) -> Case | None:
    """A BraTS case folder as a :class:`Case`, or ``None`` when its files are not BraTS-named.

    Raises :class:`InputError` for an ambiguous folder: two segmentations, two files of one
    modality, or the files of several cases in one folder."""
    folder = Path(folder)
    hits = [(p, _BRATS_FILE.match(p.name)) for p in _nifti_files(folder)]
    hits = [(p, m) for p, m in hits if m]
    if not hits:
        return None
    cases = sorted({m["case"] for _, m in hits})
    if len(cases) > 1:
        raise InputError(f"{folder}: holds the files of {len(cases)} BraTS cases ({', '.join(cases[:3])}...); "
                         "keep one case per folder, as the BraTS releases do.")
    images: dict[str, Path] = {}
    segs: list[Path] = []
    new_names = False
    for p, m in hits:
        kind = m["kind"].lower()
        if kind == "seg":
            segs.append(p)
            continue
        new_names |= kind in _NEW_BRATS_NAMES
        mod = MODALITY_ALIASES[kind]
        if mod in images:
            raise InputError(f"{folder}: two {mod} images ({images[mod].name} and {p.name}); keep one.")
        images[mod] = p
    if len(segs) > 1:
        raise InputError(f"{folder}: two segmentation files ({', '.join(s.name for s in segs)}); keep one.")
    if not images:
        raise InputError(f"{folder}: holds a segmentation ({segs[0].name}) but no image (flair/t1/t1ce/t2).")
    return Case(subject=cases[0], kind="brats2023" if new_names else "brats2021", folder=folder, images=images,
                seg=segs[0] if segs else None)


def lits_cases(folder: str | os.PathLike) -> list[Case]:
    """The LiTS ``volume-N`` files of a folder, each with its ``segmentation-N`` when present."""
    folder = Path(folder)
    files = _nifti_files(folder)
    vols: dict[int, list[Path]] = {}
    segs: dict[int, list[Path]] = {}
    for p in files:
        if m := _LITS_VOLUME.match(p.name):
            vols.setdefault(int(m["n"]), []).append(p)
        elif m := _LITS_SEG.match(p.name):
            segs.setdefault(int(m["n"]), []).append(p)
    out = []
    for n in sorted(vols):
        if len(vols[n]) > 1:
            raise InputError(f"{folder}: two files for volume-{n} ({', '.join(p.name for p in vols[n])}); keep one.")
        if len(segs.get(n, [])) > 1:
            raise InputError(f"{folder}: two segmentation files for volume-{n} ({', '.join(p.name for p in segs[n])}); keep one.")
        seg = segs[n][0] if n in segs else None
        out.append(Case(subject=f"volume-{n}", kind="lits", folder=folder, images={"ct": vols[n][0]}, seg=seg,
                        aliases=(str(n), f"segmentation-{n}", f"lits-{n}")))
    orphans = sorted(set(segs) - set(vols))
    if orphans and out:
        raise InputError(f"{folder}: segmentation-{orphans[0]} has no volume-{orphans[0]}; add the volume or move the file away.")
    return out


def find_cases(root: str | os.PathLike) -> list[Case]:
    """The cases of a dataset: ``root`` may be one BraTS case folder, a folder of LiTS files, or
    a root folder of case folders (LiTS batch folders included). Raises :class:`InputError` for a
    missing or empty root, and for roots that mix BraTS and LiTS."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: is a file, not a folder; a dataset is a BraTS case folder, a LiTS folder or a root "
                         "folder of them (single NIfTI volumes are given as files, e.g. evaluate --images/--gts).")
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (expected a BraTS case folder, a LiTS folder or a dataset root).")
    case = read_case_folder(root)
    if case is not None:
        return [case]
    cases = lits_cases(root)
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise InputError(f"{root}: cannot list this folder ({exc}).") from exc
    for d in subdirs:
        c = read_case_folder(d)
        cases.extend([c] if c is not None else lits_cases(d))
    if not cases:
        raise InputError(f"{root}: holds no dataset cases: expected BraTS case folders (BraTS2021_00000/, "
                         "BraTS-GLI-00000-000/) or LiTS files (volume-N.nii with segmentation-N.nii).")
    kinds = {c.kind for c in cases}
    if "lits" in kinds and len(kinds) > 1:
        raise InputError(f"{root}: mixes LiTS and BraTS cases; use one root per dataset.")
    seen: dict[str, Case] = {}
    for c in cases:
        if c.subject in seen:
            raise InputError(f"{root}: subject {c.subject} appears twice ({seen[c.subject].folder} and {c.folder}); keep one.")
        seen[c.subject] = c
    return cases


def _named_like_a_case(folder: Path) -> bool:
    try:
        return any(_BRATS_FILE.match(p.name) or _LITS_VOLUME.match(p.name) for p in folder.iterdir() if p.is_file())
    except OSError:
        return False


def looks_like_dataset(path: str | os.PathLike) -> bool:
    """Is ``path`` a BraTS case folder, a LiTS folder, or a root of such folders (by file names
    only, one level down)? Plain folders of NIfTI volumes are not."""
    p = Path(path)
    if not p.is_dir():
        return False
    if _named_like_a_case(p):
        return True
    try:
        return any(_named_like_a_case(d) for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return False


def case_for_file(path: str | os.PathLike) -> Case | None:
    """The dataset case a NIfTI file belongs to (BraTS case folder, LiTS pair), if any."""
    path = Path(path)
    if _BRATS_FILE.match(path.name):
        try:
            return read_case_folder(path.parent)
        except InputError:
            return None
    if _LITS_VOLUME.match(path.name) or _LITS_SEG.match(path.name):
        try:
            for c in lits_cases(path.parent):
                if path in (c.images.get("ct"), c.seg):
                    return c
        except InputError:
            return None
    return None


def _header_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InputError(f"{path}: cannot read this NIfTI file ({type(exc).__name__}: {exc}).") from exc
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return shape, np.asarray(img.affine, dtype=float)


def check_case(case: Case, modalities: list[str] | None = None, *, seg: bool = True, atol: float = 1e-3) -> None:
    """Check, from the headers only, that the ``modalities`` asked for exist and that every image
    of the case and its segmentation share one voxel grid. The odd file (the one off the grid most
    files share) is named in a one-line :class:`InputError`."""
    for m in modalities or []:
        case.image(m)
    files = list(case.images.values()) + ([case.seg] if seg and case.seg is not None else [])
    grids = [_header_grid(f) for f in files]
    for f, (shape, _) in zip(files, grids):
        if len(shape) != 3:
            raise InputError(f"{f}: has shape {shape}, expected a 3D volume.")

    def same(a, b) -> bool:
        return a[0] == b[0] and np.allclose(a[1], b[1], atol=atol)

    ref = max(grids, key=lambda g: sum(same(g, h) for h in grids))
    ref_file = files[grids.index(ref)]
    for f, g in zip(files, grids):
        what = "segmentation" if f == case.seg else "image"
        if g[0] != ref[0]:
            raise InputError(f"{f}: {what} of shape {g[0]} differs from {ref_file.name} {ref[0]}; "
                             "every file of a case must be on one voxel grid (resample it first).")
        if not np.allclose(g[1], ref[1], atol=atol):
            raise InputError(f"{f}: {what} affine differs from {ref_file.name} (max difference "
                             f"{np.abs(g[1] - ref[1]).max():.4g} mm); every file of a case must share one grid.")


# -- subjects ----------------------------------------------------------------------------------
def read_subject_list(path: str | os.PathLike) -> list[str]:
    """Subject names from a text file: one per line (commas or spaces also separate); blank
    lines and ``#`` comments are ignored; a path or file name is reduced to its case name."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad, Excel) is not part of the first name
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read this subject list ({exc}).") from exc
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for tok in re.split(r"[,\s]+", line.strip()):
            if not tok:
                continue
            name = Path(tok.rstrip("/")).name
            m = _BRATS_FILE.match(name) or _LITS_VOLUME.match(name) or _LITS_SEG.match(name)
            if m is not None:
                name = m["case"] if "case" in m.groupdict() else f"volume-{m['n']}"
            names.append(name)
    if not names:
        raise InputError(f"{path}: the subject list is empty.")
    return names


def _resolve(cases: list[Case], names: list[str], source: str) -> set[str]:
    index = {n.lower(): c.subject for c in cases for n in c.names()}
    unknown = [n for n in names if n.lower() not in index]
    if unknown:
        raise InputError(f"{source}: {len(unknown)} subject(s) not in the dataset, e.g. {unknown[0]!r}; "
                         "check the names (one subject per line, as its case folder or volume-N is named).")
    return {index[n.lower()] for n in names}


def select_cases(cases: list[Case], *, subjects: str | os.PathLike | None = None,
                 exclude: str | os.PathLike | None = None) -> list[Case]:
    """Cases kept by a subject list (``subjects``) minus an exclusion list (``exclude``). A name
    in neither the dataset nor both lists is an error, so a typo never lets a test subject in."""
    keep = {c.subject for c in cases}
    if subjects is not None:
        keep = _resolve(cases, read_subject_list(subjects), str(subjects))
    if exclude is not None:
        out = _resolve(cases, read_subject_list(exclude), str(exclude))
        both = sorted(keep & out) if subjects is not None else []
        if both:
            raise InputError(f"subject {both[0]} is in both {subjects} and {exclude} ({len(both)} in all); "
                             "a subject is either in the bank or held out.")
        keep -= out
    chosen = [c for c in cases if c.subject in keep]
    if not chosen:
        raise InputError("no subjects left after --subjects / --exclude-subjects.")
    return chosen


def dataset_kind(cases: list[Case]) -> DatasetKind:
    """The layout of a set of cases. BraTS 2021 and 2023+ cases together are refused, naming the
    cases of each: their label numbers differ (enhancing tumour 4 vs 3, so ``--lesion-labels`` and
    the reports would mean different things per case) and the 2023 release re-issues the 2021
    patients under new names, so one patient could sit in a bank and in its test set."""
    kinds = {c.kind for c in cases}
    if kinds == {"brats2021", "brats2023"}:
        raise InputError(_mixed_releases(cases))
    if len(kinds) == 1:
        return KINDS[kinds.pop()]
    return KINDS["nifti"]


def _mixed_releases(cases: list[Case]) -> str:
    def named(kind: str) -> str:
        subs = [c.subject for c in cases if c.kind == kind]
        return f"{len(subs)} {KINDS[kind].title} case{'s' if len(subs) > 1 else ''} ({', '.join(subs[:3])}{' ...' if len(subs) > 3 else ''})"

    def number(c: Case) -> str | None:
        m = re.search(r"(\d{5})", c.subject)
        return m[1] if m else None

    old = {number(c): c.subject for c in cases if c.kind == "brats2021"}
    twins = [(old[number(c)], c.subject) for c in cases if c.kind == "brats2023" and number(c) in old]
    twin = f"; {twins[0][0]} and {twins[0][1]} may be one patient" if twins else ""
    roots = sorted({str(c.folder.parent) for c in cases})
    return (f"{roots[0]}: mixes BraTS releases: {named('brats2021')} and {named('brats2023')}; their label numbers differ "
            f"(enhancing tumour 4 in 2021, 3 in 2023) and the 2023 release re-issues the 2021 patients under new names{twin}. "
            "Keep one release per root, or choose one with --subjects / --exclude-subjects.")


# -- lesion-free slices ----------------------------------------------------------------------------
def check_margin(margin) -> int:
    """``--margin`` as a number of slices: a whole number, 0 or more."""
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise InputError(f"--margin {margin}: must be a whole number of slices, 0 or more (kept slices lie more than "
                         f"this many slices from any labelled slice; default {defaults.DATASET_MARGIN}).")
    return int(margin)


def normal_slices(labels: np.ndarray, axis: int, *, margin: int = defaults.DATASET_MARGIN, normal: tuple[int, ...] = (0,)) -> np.ndarray:
    """Boolean per slice along ``axis``: every label of the slice is normal tissue (``normal``)
    and the slice is more than ``margin`` slices away from any slice that is not."""
    check_margin(margin)
    lab = np.moveaxis(np.asarray(labels), axis, 0)
    abnormal = (~np.isin(lab, np.asarray(normal))).reshape(lab.shape[0], -1).any(axis=1)
    if margin and abnormal.any():
        abnormal = ndimage.binary_dilation(abnormal, structure=np.ones(2 * margin + 1, bool))
    return ~abnormal
