"""Several sequences of a BraTS case for the encoder's three channels: their names (either
release's spelling), the file each would have in a case folder, and the files of a case, a missing
one refused with one line naming it."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import InputError
from .datasets import Case, canonical_modality

__all__ = ["parse_sequences", "sequence_file_name", "case_sequence_files"]

#: The BraTS 2023+ name of each canonical sequence.
_NEW_NAME = {"flair": "t2f", "t1ce": "t1c", "t1": "t1n", "t2": "t2w"}


def parse_sequences(text: str) -> tuple[str, ...]:
    """``"flair,t1ce,t2"`` (either naming: ``"t2f,t1c,t2w"``) -> canonical names. One sequence, or
    three: a SAM-family encoder takes three channels, which then hold three sequences of a case."""
    names = [canonical_modality(t) for t in re.split(r"[,+\s]+", str(text).strip()) if t]
    if not names:
        raise InputError("--modality: name a sequence (flair, t1, t1ce, t2) or three, e.g. flair,t1ce,t2.")
    if len(set(names)) != len(names):
        raise InputError(f"--modality {text}: a sequence is named twice; give three different ones, e.g. flair,t1ce,t2.")
    if len(names) not in (1, 3):
        raise InputError(f"--modality {text}: give one sequence or three (the encoder's three channels), e.g. flair,t1ce,t2.")
    if len(names) > 1 and "ct" in names:
        raise InputError(f"--modality {text}: CT has one image per case; several sequences are for BraTS cases.")
    return tuple(names)


def sequence_file_name(case: Case, modality: str) -> str:
    """The file name ``case`` would give ``modality`` in its release's naming."""
    mod = canonical_modality(modality)
    if case.kind == "brats2023":
        return f"{case.subject}-{_NEW_NAME.get(mod, mod)}.nii.gz"
    return f"{case.subject}_{mod}.nii.gz"


def case_sequence_files(case: Case, sequences) -> list[Path]:
    """The files of ``sequences`` in ``case``; a missing one: a one-line :class:`InputError` naming it."""
    out = []
    for m in sequences:
        mod = canonical_modality(m)
        if mod not in case.images:
            raise InputError(f"{case.folder / sequence_file_name(case, mod)}: missing; the bank takes "
                             f"{', '.join(sequences)} from every case (case {case.subject} has {', '.join(sorted(case.images))}).")
        out.append(case.images[mod])
    return out
