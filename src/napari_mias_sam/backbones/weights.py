"""Known SAM-family checkpoints: where to download them, their published hashes, and checks of a
file the user supplies.

Downloads go through pooch into ``<user cache>/weights/`` (``MIAS_SAM_CACHE`` moves it): pooch
writes to a temporary file in that folder, checks the hash and only then renames it into place, so
a failed or corrupted download leaves nothing behind. A file passed with ``--checkpoint`` is
hashed once (remembered per path, size and modification time) and named when it is a known file;
an unknown file is accepted with a warning.

Hashes (checked against public sources; never computed here, as these machines cannot download):
the three SAM checkpoints' SHA-256 values are the ones segment-anything's users and micro-sam's
model registry verify against; MedSAM's authors publish only an MD5 (Zenodo record 10689643), so
that entry is checked by MD5.

``MIAS_SAM_WEIGHTS_REGISTRY`` may name a JSON file ``{name: {url, filename, hash, variant,
title}}`` whose entries are added to (or replace) the built-in ones (mirrors, tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import WeightsError

__all__ = ["WeightsEntry", "UnknownWeightsWarning", "registry", "weights_dir", "fetch", "local_file",
           "file_digests", "identify", "check_checkpoint", "checkpoint_error"]


@dataclass(frozen=True)
class WeightsEntry:
    name: str  #: registry name, e.g. ``sam-vit_b``
    variant: str  #: SAM architecture the weights fit: vit_b / vit_l / vit_h
    filename: str
    url: str
    hash: str | None  #: ``sha256:<hex>`` or ``md5:<hex>`` (pooch's format); None: not published
    title: str

    @property
    def backbone(self) -> str:
        """The ``--backbone`` these weights are used with."""
        return f"sam-{self.variant}"


_BUILTIN = (
    WeightsEntry("sam-vit_b", "vit_b", "sam_vit_b_01ec64.pth",
                 "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
                 "sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
                 "Segment Anything ViT-B (Meta AI, Apache-2.0)"),
    WeightsEntry("sam-vit_l", "vit_l", "sam_vit_l_0b3195.pth",
                 "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
                 "sha256:3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
                 "Segment Anything ViT-L (Meta AI, Apache-2.0)"),
    WeightsEntry("sam-vit_h", "vit_h", "sam_vit_h_4b8939.pth",
                 "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
                 "sha256:a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
                 "Segment Anything ViT-H (Meta AI, Apache-2.0)"),
    WeightsEntry("medsam-vit_b", "vit_b", "medsam_vit_b.pth",
                 "https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
                 "md5:3bb6db55bd0c9ca30b61248bca72f8d6",
                 "MedSAM ViT-B (Ma et al. 2024; SAM ViT-B fine-tuned on medical images)"),
)


class UnknownWeightsWarning(UserWarning):
    """A checkpoint file whose hash is in no registry entry (used as given)."""


def registry() -> dict[str, WeightsEntry]:
    """The built-in entries, plus or replaced by those of ``$MIAS_SAM_WEIGHTS_REGISTRY``."""
    reg = {e.name: e for e in _BUILTIN}
    extra = os.environ.get("MIAS_SAM_WEIGHTS_REGISTRY")
    if extra:
        try:
            data = json.loads(Path(extra).read_text())
            for name, d in data.items():
                reg[name] = WeightsEntry(name, d["variant"], d["filename"], d["url"], d.get("hash"), d.get("title", name))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{extra} (MIAS_SAM_WEIGHTS_REGISTRY): not a weights registry ({exc}).") from exc
    return reg


def _entry(name: str) -> WeightsEntry:
    reg = registry()
    if name not in reg:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(reg)} (mias-sam weights list).")
    return reg[name]


def weights_dir() -> Path:
    """Where downloaded checkpoints live (``<user cache>/weights``)."""
    from ..core.paths import cache_dir

    path = cache_dir() / "weights"
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_file(name: str) -> Path | None:
    """The downloaded file of registry entry ``name`` when it is there (not re-verified)."""
    path = weights_dir() / _entry(name).filename
    return path if path.is_file() else None


def fetch(name: str, *, progressbar: bool = False) -> Path:
    """Download registry entry ``name`` (once) and verify its hash; returns the file's path.

    A file already there is re-hashed and downloaded again if it does not match. A download whose
    hash does not match is deleted and raises :class:`WeightsError`; nothing is left behind.
    """
    import pooch

    e = _entry(name)
    dest = weights_dir()
    pooch.get_logger().setLevel("WARNING")  # our own messages say what was downloaded where
    try:
        path = Path(pooch.retrieve(e.url, known_hash=e.hash, fname=e.filename, path=dest, progressbar=progressbar))
    except ValueError as exc:  # pooch: hash mismatch (the temporary file is already removed)
        raise WeightsError(f"{e.url}: the downloaded file does not match {e.name}'s published hash ({e.hash}); "
                           "it was deleted. Try again later or download it by hand and pass --checkpoint.") from exc
    except Exception as exc:  # no network, HTTP errors, disk full
        raise WeightsError(f"{e.name}: cannot download {e.url} ({type(exc).__name__}: {exc}). Where this machine has no "
                           f"internet, download {e.filename} elsewhere and pass its path with --checkpoint.") from exc
    if e.hash is None:
        warnings.warn(f"{e.name}: no published hash; {path} was downloaded without a check.", UnknownWeightsWarning, stacklevel=2)
    _remember(path, file_digests(path))
    return path


# -- checking a file the user gives -------------------------------------------------------------
_STORE = "weights-digests.json"


def _store_path() -> Path:
    from ..core.paths import cache_dir

    return cache_dir() / _STORE


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _remember(path: Path, digests: dict[str, str]) -> None:
    from ..data.volumes import atomic_write_text

    store = _store_path()
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    known[_key(path)] = digests
    try:
        atomic_write_text(store, json.dumps(known, indent=1))
    except OSError:
        pass


def file_digests(path: str | os.PathLike) -> dict[str, str]:
    """SHA-256 and MD5 of a (large) file in one read, remembered per (path, size, mtime)."""
    path = Path(path)
    try:
        known = json.loads(_store_path().read_text())
        if _key(path) in known:
            return dict(known[_key(path)])
    except (OSError, ValueError):
        pass
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            sha.update(block)
            md5.update(block)
    digests = {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}
    _remember(path, digests)
    return digests


def identify(path: str | os.PathLike) -> tuple[WeightsEntry | None, dict[str, str]]:
    """The registry entry whose published hash ``path`` matches (or None), and its digests."""
    digests = file_digests(path)
    for e in registry().values():
        if e.hash:
            algo, _, value = e.hash.partition(":")
            if digests.get(algo) == value.lower():
                return e, digests
    return None, digests


def check_checkpoint(path: str | os.PathLike, variant: str) -> tuple[WeightsEntry | None, str]:
    """Check a checkpoint given for SAM ``variant``: a known file of another architecture is
    refused (:class:`WeightsError`), an unknown file is accepted with an
    :class:`UnknownWeightsWarning`. Returns the entry (or None) and the file's SHA-256."""
    path = Path(path)
    entry, digests = identify(path)
    if entry is not None and entry.variant != variant:
        raise WeightsError(f"{path}: this is {entry.title} ({entry.name}), a {entry.variant} model; "
                           f"use --backbone {entry.backbone} with it, or give a {variant} checkpoint.")
    if entry is None:
        warnings.warn(f"{path.name}: not a known {variant} checkpoint (SHA-256 {digests['sha256'][:12]}...); "
                      "using it as given (mias-sam weights list shows the known files).", UnknownWeightsWarning, stacklevel=2)
    return entry, digests["sha256"]


def checkpoint_error(path, exc: BaseException, what: str) -> WeightsError:
    """A plain-words error for a weights file torch cannot read."""
    text = str(exc)
    garbage = ("Unsupported operand", "invalid load key", "zip archive", "central directory", "EOF", "magic number", "miniz")
    if any(g in text for g in garbage):
        reason = "it is not a PyTorch checkpoint, or it is truncated (an interrupted download?)"
    elif "Unsupported global" in text:
        reason = "it holds Python objects, not plain tensors, and is not loaded for safety"
    else:
        reason = f"torch could not read it: {text.splitlines()[0] if text else type(exc).__name__}"
    return WeightsError(f"{path}: cannot read this checkpoint as {what} weights: {reason}. Pass the original weights file.")
