"""Checks before the work starts: the device exists, the precision is not one that crawls on this
device, the search's memory (which grows with ``k``) fits in this machine, and a volume suits the
bank it is run against."""

from __future__ import annotations

import os
import re
import sys

from ..core.defaults import KNN_BATCH_SLICES
from ..core.errors import InputError
from ..data.checks import about, check_affine, check_slice_size

__all__ = ["check_device", "check_precision", "knn_search_bytes", "check_knn_memory", "check_volume_for_bank"]

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: Share of the available memory a run's search may take before it is refused.
MEMORY_SHARE = 0.8


def check_device(device: str | None) -> str:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` that this machine has; else :class:`InputError`."""
    import torch

    d = "auto" if device is None else str(device).strip().lower()
    if not _DEVICE_RE.match(d):
        raise InputError(f"--device {device!r}: not a device; use auto, cpu, cuda, cuda:N (N = GPU number) or mps.")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {d}: torch sees no CUDA GPU on this machine; use --device cpu or auto.")
        n = torch.cuda.device_count()
        if ":" in d and int(d.split(":")[1]) >= n:
            raise InputError(f"--device {d}: this machine has {n} CUDA GPU(s), numbered 0 to {n - 1}.")
    if d == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise InputError("--device mps: Apple's MPS is not available on this machine; use --device cpu or auto.")
    return d


def resolved_device_type(device: str) -> str:
    from ..backbones import pick_device

    return pick_device(None if device == "auto" else device).type


def check_precision(precision: str, device: str) -> None:
    """fp16 on a CPU is refused (no CPU kernels: it took 313 s where fp32 took about 20 s on the
    same volume, issue 14); bf16 on a CPU gets a warning (emulated without bf16 units: about 50 s per
    slice in docs/performance.md; fast on CPUs and GPUs that have them)."""
    if precision == "fp32":
        return
    if resolved_device_type(device) != "cpu":
        return
    if precision == "fp16":
        raise InputError("--precision fp16 runs on a CPU without fp16 arithmetic, many times slower than fp32; use "
                         "--precision fp32 (the default) on a CPU, or run on a GPU (--device cuda).")
    print(f"warning: --precision {precision} on a CPU without bf16 units is emulated (about 50 s per slice measured, "
          "docs/performance.md) and changes the embeddings; it pays off on a GPU.", file=sys.stderr)


def knn_search_bytes(n_slices: int, k: int, ntotal: int) -> int:
    """Memory of the nearest-neighbour step for ``n_slices`` slices: the (N, 1024, k) float32
    distance array kept for the run, plus, for one batch of slices, faiss's distances and ids
    (float32 + int64) and their clipped copy (float32). Checked against a measured peak with
    benchmarks/knn_memory_check.py (docs/performance.md)."""
    from ..method.patches import GRID

    k = max(1, min(int(k), int(ntotal)))
    per_slice = GRID * GRID * k
    return n_slices * per_slice * 4 + min(n_slices, KNN_BATCH_SLICES) * per_slice * (4 + 8 + 4)


def check_knn_memory(k: int, n_slices: int, ntotal: int, *, what: str = "--k") -> None:
    """Refuse ``k`` larger than the bank, or whose search would not fit in the available memory."""
    from ..core.machine import ram_bytes

    if k > ntotal:
        raise InputError(f"{what} {k}: the bank holds only {ntotal:,} patches; k must be at most that (the method uses 1).")
    need = knn_search_bytes(n_slices, k, ntotal)
    _, avail = ram_bytes()
    if avail and need > MEMORY_SHARE * avail:
        raise InputError(f"{what} {k}: the nearest-neighbour search of {n_slices} slices would need about "
                         f"{need / 1e9:.1f} GB, more than this machine has available ({avail / 1e9:.1f} GB); use a "
                         "smaller k (the method uses 1; calibration covers 1 to 5).")


def check_volume_for_bank(volume, bank, axis: int | str | None = None, source: str | os.PathLike | None = None) -> int:
    """What a run of ``volume`` against ``bank`` needs of it, before any work: a finite invertible
    affine, slices large enough along the slicing axis (``axis`` or the bank's), and intensities
    the bank's preprocessing can use (not constant, no NaN; checked without normalising them: the
    run does that, once). Returns the number of slices."""
    from ..bank.store import preprocessing_from_bank
    from ..method.preprocess import check_intensities, resolve_axis

    source = source or volume.path or "volume"
    check_affine(volume.affine, source)
    with about(source):
        ax = resolve_axis(axis if axis is not None else bank.slice_axis, volume.affine)
    check_slice_size(volume.shape, ax, source)
    check_intensities(volume.data, preprocessing_from_bank(bank), source=str(source))
    return int(volume.shape[ax])
