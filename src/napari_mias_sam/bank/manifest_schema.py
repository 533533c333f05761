"""The memory bank's ``manifest.json`` checked against a JSON schema (jsonschema) before use.

Format 1: one index file (``index.file``). Format 2 (sharded banks): ``index.shards``, a list of
``{"file", "ntotal"}`` in id order whose counts add up to ``index.ntotal``; every file stays inside
the bank folder.

Types, allowed values (an unknown preprocessing mode, layout or index type is refused instead of
silently replaced), finite numbers only (``NaN`` / ``Infinity`` in the calibration would make every
map NaN), a feature size that matches the patch layout, and an index file that stays inside the
bank folder. A bad field gives one line naming it (``index.ntotal``, ``calibration.per_k.1.low``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jsonschema
from jsonschema import Draft202012Validator

from ..core.errors import InputError

__all__ = ["MANIFEST_SCHEMA", "validate_manifest", "index_file_inside"]

PREPROCESS_MODES = ("mri", "ct", "minmax", "png")
SLICE_AXES = ("axial", "coronal", "sagittal", "0", "1", "2")


def _schema() -> dict:
    from ..method.patches import PATCH_LAYOUTS
    from .indexes import INDEX_TYPES

    num = {"type": "number"}
    count = {"type": "integer", "minimum": 0}
    pair = {"type": "array", "items": num, "minItems": 2, "maxItems": 2}
    per_k = {
        "type": "object",
        "required": ["low", "high"],
        "properties": {
            "low": num,
            "high": num,
            "slice_max_map": {"type": "array", "items": num},
            "local_peaks": {"type": "array", "items": {"type": "array", "items": num}},
            "slice_scores": {"type": "array", "items": num},
            "patch_score_quantiles": {"type": "object", "additionalProperties": num},
            "map_quantiles": {"type": "object", "additionalProperties": num},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "napari-mias-sam memory bank manifest",
        "type": "object",
        "required": ["format", "format_version", "backbone", "preprocessing", "patch_layout", "feature_dim", "index"],
        "properties": {
            "format": {"const": "napari-mias-sam memory bank"},
            "format_version": {"type": "integer", "minimum": 1},
            "created": {"type": "string"},
            "package_version": {"type": "string"},
            "backbone": {
                "type": "object",
                "required": ["name", "weights_sha256"],
                "properties": {"name": {"type": "string", "minLength": 1}, "weights_sha256": {"type": "string", "minLength": 1}},
            },
            "preprocessing": {
                "type": "object",
                "required": ["mode"],
                "properties": {
                    "mode": {"enum": list(PREPROCESS_MODES)},
                    "percentiles": pair,
                    "window": pair,
                    "scope": {"enum": ["volume", "slice"]},
                },
            },
            "slice_axis": {"enum": list(SLICE_AXES)},
            "patch_layout": {"enum": list(PATCH_LAYOUTS)},
            "feature_dim": {"type": "integer", "minimum": 1},
            "patch": {"type": "object"},
            "index": {
                "type": "object",
                "required": ["type", "ntotal"],
                "properties": {
                    "type": {"enum": list(INDEX_TYPES)},
                    "ntotal": count,
                    "file": {"type": "string", "minLength": 1},
                    "nlist": {"type": "integer", "minimum": 1},
                    "nprobe": {"type": "integer", "minimum": 1},
                    "trained_on": count,
                    "shards": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["file", "ntotal"],
                            "properties": {"file": {"type": "string", "minLength": 1}, "ntotal": count},
                        },
                    },
                    "shard_align": {"type": "integer", "minimum": 1},
                },
            },
            "counts": {
                "type": "object",
                "properties": {"slices": count, "patches": count, "skipped_empty_slices": count},
            },
            "sources": {"type": "array", "items": {"type": "object"}},
            "calibration": {
                "type": "object",
                "properties": {
                    "method": {"type": "string"},
                    "n_slices": count,
                    "sigma": {"type": "number", "minimum": 0},
                    "per_k": {"type": "object", "patternProperties": {"^[1-9][0-9]*$": per_k}, "additionalProperties": False},
                },
            },
            "coreset": {
                "type": "object",
                "properties": {"ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "encoded_patches": count},
            },
        },
    }


def _finite_number(_checker, value) -> bool:
    """JSON numbers, NaN and infinities excluded (Python's json reads them as floats)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_TYPES = Draft202012Validator.TYPE_CHECKER.redefine("number", _finite_number)
_Validator = jsonschema.validators.extend(Draft202012Validator, type_checker=_TYPES)
MANIFEST_SCHEMA: dict | None = None
_validator = None


def _get_validator():
    global MANIFEST_SCHEMA, _validator
    if _validator is None:
        MANIFEST_SCHEMA = _schema()
        _validator = _Validator(MANIFEST_SCHEMA)
    return _validator


def _field(err: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(top level)"


def _describe(err: jsonschema.ValidationError) -> str:
    v = err.instance
    shown = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if err.validator == "type":
        want = err.validator_value
        if want == "number" or (isinstance(want, list) and "number" in want):
            return f"must be a finite number, got {shown}"
        return f"must be {'an' if str(want)[0] in 'aeiou' else 'a'} {want}, got {shown}"
    if err.validator == "enum":
        return f"is {shown}, not one of {', '.join(map(str, err.validator_value))}"
    if err.validator == "required":
        return err.message.replace("is a required property", "is missing")
    if err.validator == "additionalProperties":
        return f"has unexpected entries ({err.message})"
    if err.validator in ("minimum", "exclusiveMinimum", "maximum", "minItems", "maxItems", "minLength"):
        return f"is {shown}, out of range ({err.message.split(' is ', 1)[-1]})"
    return err.message


def validate_manifest(manifest: object, where: str | os.PathLike) -> None:
    """Raise :class:`InputError` (one line naming the field) unless ``manifest`` is a valid bank manifest."""
    from ..method.patches import feature_dim

    errors = sorted(_get_validator().iter_errors(manifest), key=lambda e: (len(e.absolute_path), _field(e)))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        raise InputError(f"{where}: field '{_field(err)}' {_describe(err)}; the bank manifest is damaged or edited by hand, "
                         "rebuild the bank with 'mias-sam build-bank'.")
    assert isinstance(manifest, dict)
    shards = manifest["index"].get("shards")
    if shards is not None and sum(int(e["ntotal"]) for e in shards) != manifest["index"]["ntotal"]:
        raise InputError(f"{where}: field 'index.shards' holds {sum(int(e['ntotal']) for e in shards)} vectors in all but "
                         f"'index.ntotal' says {manifest['index']['ntotal']}; the manifest does not describe this bank, rebuild it.")
    want = feature_dim(manifest["patch_layout"])
    if manifest["feature_dim"] != want:
        raise InputError(f"{where}: field 'feature_dim' is {manifest['feature_dim']} but layout '{manifest['patch_layout']}' "
                         f"makes {want}-d patch features; the manifest does not describe this bank, rebuild it.")


def index_file_inside(bank: Path, name: str, where: str | os.PathLike, *, field: str = "index.file") -> Path:
    """``bank / name`` if it stays inside the bank folder (links resolved); else :class:`InputError`."""
    candidate = bank / name
    root = bank.resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not candidate.resolve().is_relative_to(root):
        fix = " Rebuild the bank, or restore 'index.file' to 'index.faiss'." if field == "index.file" else " Rebuild the bank."
        raise InputError(f"{where}: field '{field}' ({name!r}) points outside the bank folder; a bank reads only its own files.{fix}")
    return candidate
