"""On-disk embedding cache keyed by content: the same slices through the same backbone weights
are encoded once, whichever volume file, widget session or evaluation sweep asks again.

Entries are written atomically (a temporary file beside the entry, renamed into place). The cache
is bounded: after each write the least recently used entries (reading an entry marks it used) are
removed until the folder holds at most ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`;
``MIAS_SAM_CACHE_MAX_GB`` or ``mias-sam cache limit`` change it)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..core.paths import cache_dir
from ..method.reference_encoding import embedding_dtype, encoding_of

__all__ = ["EmbeddingCache", "frames_key", "neighbours_key", "cached_encoder", "DEFAULT_MAX_BYTES", "cache_limit",
           "set_cache_limit"]

#: Default size cap of the embedding cache: 4 GiB. One slice's embedding (256 x 64 x 64, fp16) is
#: 2 MiB, so this holds about 2,000 slices: 13 BraTS volumes of 155 slices.
DEFAULT_MAX_BYTES = 4 * 1024**3
_ENTRY = re.compile(r"^[^.].*\.npy$")  # temporary files of writes in progress start with "."
_SETTINGS = "cache-settings.json"


def cache_limit() -> int:
    """The embedding cache's size cap in bytes: ``$MIAS_SAM_CACHE_MAX_GB``, else the value saved by
    ``mias-sam cache limit``, else :data:`DEFAULT_MAX_BYTES`."""
    env = os.environ.get("MIAS_SAM_CACHE_MAX_GB")
    if env:
        try:
            return max(0, int(float(env) * 1024**3))
        except ValueError:
            pass
    try:
        return int(json.loads((cache_dir() / _SETTINGS).read_text())["max_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_MAX_BYTES


def set_cache_limit(max_bytes: int) -> None:
    """Save the embedding cache's size cap (used by every later run)."""
    from ..data.volumes import atomic_write_text

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
