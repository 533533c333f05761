"""User-facing errors: each says which file, what is wrong and what to do."""

from __future__ import annotations

__all__ = ["MiasSamError", "InputError", "BankMismatchError", "WeightsError", "Cancelled"]


class MiasSamError(Exception):
    """Base class for errors shown to users as one line (CLI) or a notification (napari)."""


class InputError(MiasSamError, ValueError):
    """An input file or array cannot be used as given."""


class BankMismatchError(MiasSamError):
    """A memory bank was made with another backbone, weights, layout or preprocessing."""


class WeightsError(MiasSamError, FileNotFoundError):
    """A backbone's weights file is missing or is not the expected file."""


class Cancelled(MiasSamError):
    """The user cancelled a long-running job."""
