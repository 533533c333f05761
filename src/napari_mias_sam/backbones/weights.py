"""Known SAM-family checkpoints: where to download them, their published hashes, and checks of a
file the user supplies.

Downloads go through pooch into ``<user cache>/weights/`` (``MIAS_SAM_CACHE`` moves it): pooch
writes to a temporary file in that folder, checks the hash and only then renames it into place, so
a failed or corrupted download leaves nothing behind. A file passed with ``--checkpoint`` is
hashed once (remembered per path, size and modification time) and named when it is a known file;
an unknown file is accepted with a warning once it is seen to be a PyTorch checkpoint at all:
:func:`weights_file` refuses a folder, a broken link or an empty file, :func:`inspect_checkpoint`
(``mias-sam weights check``) anything that is not a state dict of named tensors (read with
``weights_only=True`` and memory-mapped, so a 2.5 GB file costs no copy).

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
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import WeightsError

__all__ = ["WeightsEntry", "UnknownWeightsWarning", "registry", "weights_dir", "fetch", "local_file",
           "file_digests", "identify", "check_checkpoint", "checkpoint_error", "weights_file", "CheckpointInfo",
           "inspect_checkpoint"]


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


def weights_file(path: str | os.PathLike, *, missing: str = "") -> Path:
    """``path`` when it can hold weights; otherwise a one-line :class:`WeightsError` naming what is
    there: nothing (``missing``: the message then, else "no such file"), a broken link, a folder (and the weights files in
    it), something other than a file, or an empty file."""
    p = Path(path).expanduser()
    if p.is_symlink() and not p.exists():
        raise WeightsError(f"{p}: a broken link (to {os.readlink(p)}, which does not exist); point it at the weights file.")
    if p.is_dir():
        try:
            found = sorted(f.name for f in p.iterdir() if f.suffix in (".pth", ".pt", ".ckpt", ".bin") and f.is_file())
        except OSError:
            found = []
        inside = f" (it holds {', '.join(found[:3])}{' ...' if len(found) > 3 else ''}: pass one of those)" if found else ""
        raise WeightsError(f"{p}: is a folder, not a weights file{inside}.")
    if not p.exists():
        raise WeightsError(f"{p}: {missing or 'no such file.'}")
    if not p.is_file():
        raise WeightsError(f"{p}: is not a regular file (a device or a pipe?); pass the weights file itself.")
    if p.stat().st_size == 0:
        raise WeightsError(f"{p}: is empty (0 bytes; an interrupted download or copy?); download the weights again.")
    return p


def _container(path: Path) -> str:
    """``zip`` (torch.save's format since PyTorch 1.6) or ``legacy`` (a pickle); a
    :class:`WeightsError` for anything else, checked from the file's first bytes and, for a zip,
    its table of contents."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":  # a pickle (protocol 2 and up), torch.save's format before 1.6
        return "legacy"
    if head != b"PK\x03\x04":
        raise WeightsError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle, as torch.save writes); "
                           "pass the original weights file.")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        raise WeightsError(f"{path}: a zip archive cut short (truncated: an interrupted download or copy?); "
                           "download the weights again.") from None
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise WeightsError(f"{path}: a zip archive but not a PyTorch checkpoint (no data.pkl inside; it holds "
                           f"{', '.join(names[:3]) or 'nothing'}); pass the original weights file.")
    return "zip"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds: its tensors, their parameters, and the backbone it is shaped like."""

    tensors: int
    parameters: int
    shaped_like: str | None  #: e.g. ``SAM ViT-B``; None when no known architecture matches
    backbone: str | None  #: the ``--backbone`` of that architecture


#: SAM image encoders by their embedding width (``image_encoder.pos_embed``'s last dimension).
_SAM_WIDTHS = {768: ("SAM ViT-B (or MedSAM)", "sam-vit_b"), 1024: ("SAM ViT-L", "sam-vit_l"), 1280: ("SAM ViT-H", "sam-vit_h")}


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Read a checkpoint safely (``weights_only``, memory-mapped) and say what it holds; a
    one-line :class:`WeightsError` for a file that is not a state dict of named tensors."""
    import torch

    path = weights_file(path)
    kind = _container(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as exc:
        raise checkpoint_error(path, exc, "model") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint: {"model": state dict, "epoch": ...}
    if isinstance(state, torch.Tensor):
        raise WeightsError(f"{path}: a PyTorch file holding one tensor, not a state dict of named tensors; pass the model's weights file.")
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        held = f"a {type(state).__name__}" + (f" of {len(state)} entries" if hasattr(state, "__len__") else "")
        raise WeightsError(f"{path}: a PyTorch file, but not a state dict of named tensors (it holds {held}); "
                           "pass the model's weights file.")
    shaped, backbone = None, None
    pos = state.get("image_encoder.pos_embed")
    if pos is not None and pos.ndim == 4 and int(pos.shape[-1]) in _SAM_WIDTHS:
        shaped, backbone = _SAM_WIDTHS[int(pos.shape[-1])]
    elif "image_encoder.patch_embed.seq.0.c.weight" in state:
        shaped, backbone = "LiteMedSAM (TinyViT encoder)", "litemedsam"
    return CheckpointInfo(len(state), int(sum(v.numel() for v in state.values())), shaped, backbone)


def check_checkpoint(path: str | os.PathLike, variant: str) -> tuple[WeightsEntry | None, str]:
    """Check a checkpoint given for SAM ``variant``: a known file of another architecture is
    refused (:class:`WeightsError`), as is a file that is not a PyTorch checkpoint at all; an
    unknown checkpoint is accepted with an :class:`UnknownWeightsWarning`. Returns the entry (or
    None) and the file's SHA-256."""
    path = weights_file(path)
    entry, digests = identify(path)
    if entry is not None and entry.variant != variant:
        raise WeightsError(f"{path}: this is {entry.title} ({entry.name}), a {entry.variant} model; "
                           f"use --backbone {entry.backbone} with it, or give a {variant} checkpoint.")
    if entry is None:
        _container(path)  # not a checkpoint at all: refused before the warning that would use it
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
