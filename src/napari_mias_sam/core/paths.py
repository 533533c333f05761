"""Where the package keeps per-user files (cache), and where the bundled sample data lives."""

from __future__ import annotations

import os
import shutil
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

__all__ = ["cache_dir", "sample_data_dir", "sample_resources", "SAMPLE_PACKAGE"]

#: The package that carries the sample volumes (the repository's ``sample_data/`` folder, installed
#: inside ``napari_mias_sam``).
SAMPLE_PACKAGE = "napari_mias_sam.sample_data"
_SAMPLE_SUFFIXES = (".nii.gz", ".md")


def cache_dir() -> Path:
    """The user cache folder (``$MIAS_SAM_CACHE`` overrides it); created on first use. A path
    that is a file, or where no folder can be made, is refused in one line naming it."""
    from .errors import InputError

    env = os.environ.get("MIAS_SAM_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("napari-mias-sam", appauthor=False))
    where = "MIAS_SAM_CACHE" if env else "the user cache folder"
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: the cache folder ({where}) is a file, not a folder; point MIAS_SAM_CACHE at a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create the cache folder ({where}): {exc.strerror or exc}; "
                         "point MIAS_SAM_CACHE at a writable folder.") from None
    return path


def sample_resources() -> dict[str, Traversable]:
    """The bundled sample files (volumes and their notes) by name, as importlib resources."""
    try:
        root = resources.files(SAMPLE_PACKAGE)
        found = {e.name: e for e in root.iterdir() if e.name.endswith(_SAMPLE_SUFFIXES) and e.is_file()}
    except (ModuleNotFoundError, OSError):
        return {}
    return found if any(name.endswith(".nii.gz") for name in found) else {}


def sample_data_dir() -> Path:
    """A folder on disk holding the bundled sample volumes.

    The installed package's own folder when its files are plain files on disk (a wheel or an
    editable install); otherwise (a zip archive) a copy made once in the user cache folder.
    Raises :class:`~napari_mias_sam.core.errors.InputError` when the package carries no sample.
    """
    from .errors import InputError

    files = sample_resources()
    if not files:
        raise InputError(
            f"the bundled sample data is missing from the installed package ({SAMPLE_PACKAGE}); "
            "reinstall napari-mias-sam (pip install --force-reinstall napari-mias-sam)."
        )
    parents = {Path(e).parent for e in files.values() if isinstance(e, Path)}
    if len(parents) == 1 and all(isinstance(e, Path) for e in files.values()):
        return parents.pop()
    return _extracted(files)


def _extracted(files: dict[str, Traversable]) -> Path:
    """Copies of ``files`` in the user cache (written atomically; kept while they match)."""
    from .._version import __version__

    dest = cache_dir() / f"sample-data-{__version__}"
    dest.mkdir(parents=True, exist_ok=True)
    for name, entry in files.items():
        target = dest / name
        with resources.as_file(entry) as src:
            if target.is_file() and target.stat().st_size == Path(src).stat().st_size:
                continue
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
    return dest
