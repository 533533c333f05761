"""Shared helpers of the core tests (tests/test_*.py, tests/bank/, tests/backbones/...): a counting
backbone wrapper, synthetic 'anatomy' volumes, NIfTI writers, file fingerprints, and the real LiteMedSAM backbone
loaded once per test session."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


__all__ = [
    "CountingBackbone",
    "litemedsam",
    "anatomy_volume",
    "disk",
    "write_nifti",
    "oblique_affine",
    "sha256",
    "snapshot",
    "frames_from_seed",
]


class CountingBackbone:
    """Wraps a backbone and counts ``encode`` calls (a cache hit must avoid them); everything
    else, identity and precision included, is the wrapped backbone's."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.encode_calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, frames):
        self.encode_calls += 1
        return self.inner.encode(frames)


@functools.lru_cache(maxsize=1)
def litemedsam():
    """The real LiteMedSAM backbone (bundled weights, CPU), built once per test process."""
    from napari_mias_sam.backbones import load_backbone

    return load_backbone("litemedsam", device="cpu")


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.indices(shape)
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def anatomy_volume(shape=(64, 64, 3), seed: int = 0, noise: float = 0.03, blob: dict | None = None) -> np.ndarray:
    """Smooth synthetic 'anatomy' (an ellipse body with a darker inner ellipse and a gentle
    gradient) on a zero background, plus Gaussian noise inside the body. ``blob`` =
    ``{"centre": (row, col), "radius": r, "value": v, "slices": [k, ...]}`` adds a bright disk."""
    rng = np.random.default_rng(seed)
    h, w, n = shape
    rr, cc = np.indices((h, w)).astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    out = np.zeros(shape, np.float32)
    for k in range(n):
        body = ((rr - cy) / (0.42 * h)) ** 2 + ((cc - cx) / (0.36 * w)) ** 2 <= 1
        inner = ((rr - cy - 0.02 * k * h) / (0.15 * h)) ** 2 + ((cc - cx) / (0.10 * w)) ** 2 <= 1
        sl = np.where(body, 0.55 + 0.15 * (rr / h) + 0.05 * np.cos(cc / w * np.pi), 0.0)
        sl = np.where(inner, 0.25, sl)
        sl = sl + body * rng.normal(0.0, noise, size=(h, w))
        if blob is not None and k in blob.get("slices", range(n)):
            sl = np.where(disk((h, w), blob["centre"], blob["radius"]), blob.get("value", 1.0), sl)
        out[..., k] = np.clip(sl, 0.0, None)
    return out


def oblique_affine() -> np.ndarray:
    """A non-identity, oblique affine with a flip: rotation 30 deg about z and 10 deg about x,
    anisotropic spacing (0.8, 1.2, 2.5) mm, x flipped, and a translation."""
    a, b = np.deg2rad(30.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = rz @ rx @ np.diag([-0.8, 1.2, 2.5])
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = (12.5, -30.25, 7.0)
    return aff


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, *, qcode: int = 1, scode: int = 1) -> Path:
    """Write ``data`` with ``affine`` and the given qform/sform codes (independently of the package)."""
    aff = np.eye(4) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(data), aff)
    img.set_qform(aff, code=qcode)
    img.set_sform(aff, code=scode)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (hidden files included)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def frames_from_seed(n: int, seed: int, *, size: int = 256) -> torch.Tensor:
    """n smooth random frames (values in [0, 1]) from a seed: 8x8 noise upsampled bicubically."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 8, 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0].clamp(0, 1)
