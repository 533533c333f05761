"""On-disk embedding cache keyed by content: the same slices through the same backbone weights
are encoded once, whichever volume file, widget session or evaluation sweep asks again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .paths import cache_dir
from .reference_io import embedding_dtype, encoding_of

__all__ = ["EmbeddingCache", "frames_key", "cached_encoder"]


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


class EmbeddingCache:
    """Embeddings stored as ``.npy`` files (plain arrays, never pickles) in a folder: float16, or
    float32 for the ``reference`` encoding (which keeps them exact)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "embeddings"
        self.root.mkdir(parents=True, exist_ok=True)

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
        return torch.from_numpy(arr)

    def put(self, key: str, embeddings: torch.Tensor, *, dtype: torch.dtype = torch.float16) -> Path:
        from .io import atomic_path

        p = self.path(key)
        with atomic_path(p) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, embeddings.detach().cpu().to(dtype).numpy(), allow_pickle=False)
        return p

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.glob("*.npy"))

    def clear(self) -> int:
        n = 0
        for f in self.root.glob("*.npy"):
            f.unlink(missing_ok=True)
            n += 1
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
