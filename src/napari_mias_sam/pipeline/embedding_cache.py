"""On-disk embedding cache keyed by content: the same slices through the same backbone weights
are encoded once, whichever volume file, widget session or evaluation sweep asks again.

Entries are written atomically (a temporary file beside the entry, renamed into place). The cache
is bounded: after each write the least recently used entries (reading an entry marks it used) are
removed until the folder holds at most ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`;
``MIAS_SAM_CACHE_MAX_GB`` or ``mias-sam cache limit`` change it). A limit is checked for what it
means (:func:`parse_cache_limit`: a size, not negative, not larger than the disk, not a bare number
of bytes smaller than one entry); a saved or environment value that is not one is named in a
warning and the default applies."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError
from ..core.machine import human_bytes
from ..core.paths import cache_dir
from ..method.reference_encoding import embedding_dtype, encoding_of

__all__ = ["EmbeddingCache", "frames_key", "neighbours_key", "cached_encoder", "DEFAULT_MAX_BYTES", "cache_limit",
           "set_cache_limit", "parse_cache_limit", "CacheSettingsWarning", "TOOL_FILES"]

#: Default size cap of the embedding cache: 4 GiB. One slice's embedding (256 x 64 x 64, fp16) is
#: 2 MiB, so this holds about 2,000 slices: 13 BraTS volumes of 155 slices.
DEFAULT_MAX_BYTES = 4 * 1024**3
_ENTRY = re.compile(r"^[^.].*\.npy$")  # temporary files of writes in progress start with "."
_SETTINGS = "cache-settings.json"


#: What the tool itself keeps in the cache folder (``mias-sam cache clear --all`` removes these and
#: nothing else): embeddings, ONNX exports, downloaded weights and their digests, the settings,
#: the copies of the bundled sample data (``sample-data-<version>``).
TOOL_FILES = ("embeddings", "onnx", "weights", "weights-digests.json", _SETTINGS, "sample-data-*")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SMALLEST_BARE = 1024**2  # a number without a unit below this is a forgotten unit, not a byte count


class CacheSettingsWarning(UserWarning):
    """A saved or environment cache limit that is not a size (the default applies instead)."""


def parse_cache_limit(text: str, *, disk_bytes: int | None = None) -> int:
    """A cache limit as the user writes it (``500M``, ``8G``, ``8 GiB``, ``0``; binary units; a bare
    number is bytes) in bytes. Refused (:class:`InputError`, naming the value): anything that is not
    a finite size, a negative size, more than the disk holding the cache folder (``disk_bytes``,
    default: measured), and a bare number under 1 MiB (``8``: 8 bytes is surely 8G meant)."""
    m = _SIZE.match(str(text))
    if m is None:
        raise InputError(f"{text!r}: not a size; write e.g. 500M or 8G (binary units: K, M, G, T).")
    value, unit, explicit_bytes = float(m[1]), m[2].upper(), bool(m[3])
    if value < 0:
        raise InputError(f"{text!r}: a size cannot be negative; write e.g. 8G, or 0 to keep only the newest entry.")
    size = value * _UNITS[unit]
    if disk_bytes is None:
        disk_bytes = shutil.disk_usage(cache_dir()).total
    if size > disk_bytes:
        raise InputError(f"{text!r} is larger than the whole disk holding the cache folder ({human_bytes(disk_bytes)}); "
                         f"give a limit up to that, e.g. {human_bytes(disk_bytes // 4)}.")
    if not unit and not explicit_bytes and 0 < size < _SMALLEST_BARE:
        raise InputError(f"{text!r}: {int(size)} bytes is smaller than one cached slice (about 2 MiB); write {text.strip()}G for "
                         f"{text.strip()} GiB or {text.strip()}M for {text.strip()} MiB ({text.strip()}B if you mean bytes).")
    return int(size)


def _warn(message: str) -> None:
    warnings.warn(message, CacheSettingsWarning, stacklevel=3)


def cache_limit() -> int:
    """The embedding cache's size cap in bytes: ``$MIAS_SAM_CACHE_MAX_GB`` (GiB, or a size such as
    ``500M``), else the value saved by ``mias-sam cache limit``, else :data:`DEFAULT_MAX_BYTES`. A
    value that is not a size is named in a :class:`CacheSettingsWarning` and skipped."""
    env = os.environ.get("MIAS_SAM_CACHE_MAX_GB")
    if env:
        try:
            text = env.strip()
            return parse_cache_limit(text + ("G" if re.fullmatch(r"[0-9.eE+-]+", text) else ""))
        except InputError as exc:
            why = str(exc).split(": ", 1)[-1].rstrip(".")
            _warn(f"MIAS_SAM_CACHE_MAX_GB={env!r} is not a cache size in GiB such as 8 or 0.5 ({why}); it is ignored.")
    settings = cache_dir() / _SETTINGS
    try:
        text = settings.read_text()
    except FileNotFoundError:
        return DEFAULT_MAX_BYTES
    except OSError as exc:
        _warn(f"{settings}: cannot be read ({exc.strerror or exc}); the default limit {human_bytes(DEFAULT_MAX_BYTES)} applies.")
        return DEFAULT_MAX_BYTES
    try:
        value = json.loads(text)["max_bytes"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max_bytes {value!r} is not a size in bytes")
        return value
    except (ValueError, KeyError, TypeError) as exc:
        _warn(f"{settings}: not a cache setting ({exc}); the default limit {human_bytes(DEFAULT_MAX_BYTES)} applies "
              "(mias-sam cache limit SIZE saves a new one).")
        return DEFAULT_MAX_BYTES


def set_cache_limit(max_bytes: int) -> None:
    """Save the embedding cache's size cap (used by every later run)."""
    from ..data.volumes import atomic_write_text

    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise InputError(f"cache limit {max_bytes!r}: not a size in bytes.")
    atomic_write_text(cache_dir() / _SETTINGS, json.dumps({"max_bytes": int(max_bytes)}))


def frames_key(frames: torch.Tensor, backbone_info: dict, *, precision: str = "fp32") -> str:
    """SHA-256 of the model-frame slices plus the backbone's identity, precision and encoding."""
    h = hashlib.sha256()
    h.update(str(backbone_info.get("name")).encode())
    h.update(str(backbone_info.get("weights_sha256")).encode())
    h.update(precision.encode())
    if encoding_of(backbone_info) != "standard":  # standard keys stay as they were (existing caches)
        h.update(f"encoding={encoding_of(backbone_info)}".encode())
    arr = frames.detach().cpu().float().contiguous().numpy()
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def neighbours_key(embeddings_key: str, bank_fingerprint: str, k: int) -> str:
    """Key of a volume's nearest-neighbour distances: its embeddings (their :func:`frames_key`),
    the bank's content and k. Starts with ``knn-`` (the embeddings' keys are bare digests)."""
    h = hashlib.sha256(f"{embeddings_key}|{bank_fingerprint}|k={int(k)}".encode())
    return "knn-" + h.hexdigest()


class EmbeddingCache:
    """Embeddings stored as ``.npy`` files (plain arrays, never pickles) in a folder: float16, or
    float32 for the ``reference`` encoding (which keeps them exact). The same folder (and size
    cap) keeps each volume's nearest-neighbour distances against a bank (:meth:`get_array`,
    :meth:`put_array` with :func:`neighbours_key`), so a volume opened again with the same bank
    waits on neither the encoder nor the search."""

    def __init__(self, root: str | os.PathLike | None = None, *, max_bytes: int | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "embeddings"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = cache_limit() if max_bytes is None else int(max_bytes)

    def entries(self) -> list[Path]:
        """The cache's entry files (not the temporary files of writes in progress)."""
        return [f for f in self.root.iterdir() if _ENTRY.match(f.name) and f.is_file()]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def get(self, key: str) -> torch.Tensor | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # EOFError: an empty (zero-byte) file
            p.unlink(missing_ok=True)  # damaged entry: forget it, it will be recomputed
            return None
        try:
            os.utime(p)  # mark it used (the eviction order is the files' modification times)
        except OSError:
            pass
        return torch.from_numpy(arr)

    def get_array(self, key: str) -> np.ndarray | None:
        """A stored array as it was put (``None`` when absent or damaged)."""
        t = self.get(key)
        return None if t is None else t.numpy()

    def put_array(self, key: str, array: np.ndarray) -> Path:
        """Store a numpy array as it is (dtype kept)."""
        from ..data.volumes import atomic_path

        p = self.path(key)
        with atomic_path(p) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        self.evict(keep=p)
        return p

    def put(self, key: str, embeddings: torch.Tensor, *, dtype: torch.dtype = torch.float16) -> Path:
        from ..data.volumes import atomic_path

        p = self.path(key)
        with atomic_path(p) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, embeddings.detach().cpu().to(dtype).numpy(), allow_pickle=False)
        self.evict(keep=p)
        return p

    def _stats(self) -> list[tuple[float, int, Path]]:
        out = []
        for f in self.entries():
            try:
                st = f.stat()
            except OSError:  # removed meanwhile by another process
                continue
            out.append((st.st_mtime, st.st_size, f))
        return out

    def evict(self, *, keep: Path | None = None) -> int:
        """Remove least recently used entries until the cache holds at most ``max_bytes``
        (``keep``, the entry just written, stays). Returns the number removed."""
        stats = sorted(self._stats(), key=lambda s: s[0])
        total = sum(s[1] for s in stats)
        removed = 0
        for _, size, f in stats:
            if total <= self.max_bytes:
                break
            if keep is not None and f == keep:
                continue
            f.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

    def size_bytes(self) -> int:
        return sum(s[1] for s in self._stats())

    def info(self) -> dict:
        """Folder, entry count, size, cap and the oldest / newest use (UTC, ISO 8601)."""
        stats = self._stats()
        iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
        return {
            "folder": str(self.root),
            "entries": len(stats),
            "bytes": sum(s[1] for s in stats),
            "max_bytes": self.max_bytes,
            "oldest_use": iso(min(s[0] for s in stats)) if stats else None,
            "newest_use": iso(max(s[0] for s in stats)) if stats else None,
        }

    def clear(self) -> int:
        """Remove every entry (and temporary files left by interrupted writes); returns the count
        of entries removed."""
        n = 0
        for f in self.root.iterdir():
            if _ENTRY.match(f.name):
                f.unlink(missing_ok=True)
                n += 1
            elif f.name.startswith(".") and ".part" in f.name and time.time() - f.stat().st_mtime > 3600:
                f.unlink(missing_ok=True)  # an interrupted write (an hour old: not one in progress)
        return n


def cached_encoder(backbone, cache: EmbeddingCache):
    """``backbone.encode`` through ``cache``, one entry per batch of frames. Embeddings always come
    back as the cache stores them (float16 values as float32, or float32 for the ``reference``
    encoding), so a first and a repeated run give identical results."""
    info = backbone.describe()
    precision = getattr(backbone, "precision", "fp32")
    dtype = embedding_dtype(backbone)

    def encode(frames: torch.Tensor) -> torch.Tensor:
        key = frames_key(frames, info, precision=precision)
        emb = cache.get(key)
        if emb is None or len(emb) != len(frames):
            emb = backbone.encode(frames).detach().cpu().to(dtype)
            cache.put(key, emb, dtype=dtype)
        return emb.float()

    return encode
