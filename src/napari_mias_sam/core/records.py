"""Settings dataclasses as JSON-ready dicts (recorded in banks, results and reports)."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["to_dict", "json_ready"]


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a settings dataclass (tuples become lists)."""
    return json_ready(dataclasses.asdict(obj))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value
