"""The normal memory bank: faiss index types, the bank folder (store, save, load; its manifest's
JSON schema), building and calibration, and the exact torch kNN and coreset selection that building uses.

``from napari_mias_sam.bank import MemoryBank, build_bank, load_bank`` is the public entry."""

from __future__ import annotations

from .build import CALIBRATION_KS, build_bank
from .indexes import INDEX_TABLE, INDEX_TYPES
from .store import (
    BANK_FORMAT,
    BANK_FORMAT_VERSION,
    MemoryBank,
    SliceGroup,
    bank_output,
    check_backbone_name,
    check_compatible,
    estimate_bank_memory,
    load_bank,
)

__all__ = [
    "BANK_FORMAT",
    "BANK_FORMAT_VERSION",
    "CALIBRATION_KS",
    "INDEX_TABLE",
    "INDEX_TYPES",
    "MemoryBank",
    "SliceGroup",
    "bank_output",
    "build_bank",
    "check_backbone_name",
    "check_compatible",
    "estimate_bank_memory",
    "load_bank",
]
