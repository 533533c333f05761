"""Where the package keeps per-user files (cache), and where the bundled sample data lives."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["cache_dir", "sample_data_dir"]


def cache_dir() -> Path:
    """The user cache folder (``$MIAS_SAM_CACHE`` overrides it); created on first use."""
    env = os.environ.get("MIAS_SAM_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("napari-mias-sam", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sample_data_dir() -> Path:
    """Folder holding the bundled sample volumes (installed package data, or the source checkout)."""
    try:
        pkg = resources.files("napari_mias_sam.sample_data")
        path = Path(str(pkg))
        if path.is_dir() and any(path.glob("*.nii.gz")):
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    checkout = Path(__file__).resolve().parents[2] / "sample_data"
    return checkout
