"""Memory told before the work: what a bank build, a ``segment`` run or an ``evaluate`` run will hold,
in each process (this one, and every Dask worker), and a refusal that says what to change when it
does not fit.

What is counted: the process itself (Python, torch, faiss, this package), the backbone and its
runtime, the volume (or bank source) in flight with its frames and features, the index (whole, or
one shard at a time), the calibration's search buffers, and for ``evaluate`` the embeddings and
decoder outputs it keeps. Measured figures are marked as such; the others are estimated from array
sizes (docs/distributed.md, "Memory").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..bank import estimate_bank_memory
from ..bank.build import CALIBRATION_BATCH
from ..bank.indexes import TRAIN_MAX, check_index_type
from ..core.errors import InputError
from ..method.patches import GRID, feature_dim

__all__ = ["PROCESS_BASE_BYTES", "model_bytes", "MemoryPlan", "plan_build_memory", "plan_run_memory", "gb"]

#: Python + torch + faiss + this package, imported: 547 MB measured (2026-12, Linux x86-64, CPU torch).
PROCESS_BASE_BYTES = 550_000_000
#: LiteMedSAM on a CPU, weights and ONNX Runtime sessions: the process grew from 547 MB to 817 MB on
#: loading and to 1,489 MB after encoding a batch of 4 slices (measured, 2026-12).
LITEMEDSAM_LOADED = 270_000_000
LITEMEDSAM_PER_SLICE = 170_000_000
#: SAM image encoders' weights files (published sizes); estimated activations per 1,024^2 slice.
SAM_WEIGHTS = {"vit_b": 375_000_000, "vit_l": 1_250_000_000, "vit_h": 2_560_000_000}
SAM_PER_SLICE = 1_000_000_000
#: torch's exact search on a CPU reads the bank in chunks of this many vectors (bank.knn.torch_knn).
TORCH_CHUNK = 65_536


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def model_bytes(backbone: str, batch_size: int) -> int:
    """Host memory of a backbone and its runtime while it encodes batches of ``batch_size`` slices."""
    if backbone.startswith("sam-") or backbone.startswith("medsam-"):
        w = SAM_WEIGHTS.get(backbone.split("-", 1)[1], SAM_WEIGHTS["vit_h"])
        return int(2 * w + SAM_PER_SLICE * batch_size)
    return int(LITEMEDSAM_LOADED + LITEMEDSAM_PER_SLICE * max(batch_size, 1))


@dataclass
class MemoryPlan:
    """Bytes per process: ``parts`` name -> bytes of this process, ``worker_parts`` of each Dask
    worker (empty without Dask); ``workers``: how many; ``local_workers``: how many of them run on
    this machine (a local cluster: all)."""

    what: str
    parts: dict[str, int]
    worker_parts: dict[str, int] = field(default_factory=dict)
    workers: int = 0
    local_workers: int = 0
    remedies: list[str] = field(default_factory=list)

    @property
    def here(self) -> int:
        return sum(self.parts.values())

    @property
    def per_worker(self) -> int:
        return sum(self.worker_parts.values())

    @property
    def on_this_machine(self) -> int:
        return self.here + self.local_workers * self.per_worker

    def lines(self) -> list[str]:
        out = [f"memory plan ({self.what}): this process {gb(self.here)} = "
               + " + ".join(f"{k} {gb(v)}" for k, v in self.parts.items() if v)]
        if self.workers:
            out.append(f"  each of {self.workers} Dask worker(s) {gb(self.per_worker)} = "
                       + " + ".join(f"{k} {gb(v)}" for k, v in self.worker_parts.items() if v)
                       + (f"; {gb(self.on_this_machine)} on this machine in all ({self.local_workers} of the workers here)"
                          if self.local_workers else ""))
        return out

    def check(self, available: int | None, worker_limits: dict[str, int] | None = None) -> None:
        """Refuse (one :class:`InputError`) a plan that does not fit: on this machine (everything
        local), and per worker (each remote worker's memory limit)."""
        problems = []
        if available and self.on_this_machine > available:
            problems.append(f"needs about {gb(self.on_this_machine)} on this machine, which has {gb(available)} available")
        for addr, limit in (worker_limits or {}).items():
            if limit and self.per_worker > limit:
                problems.append(f"needs about {gb(self.per_worker)} per Dask worker, more than worker {addr}'s limit of {gb(limit)}")
                break
        if problems:
            fix = "; ".join(self.remedies) if self.remedies else "use a machine with more memory"
            raise InputError(f"{self.what}: {' and '.join(problems)} ({', '.join(f'{k} {gb(v)}' for k, v in self.parts.items() if v)}"
                             + (f"; per worker {gb(self.per_worker)}" if self.workers else "") + f"). Change the plan: {fix}.")


def _volume_bytes(paths: list[str | None], n_slices: list[int]) -> int:
    """The largest source in flight: its voxels (float32 image and a label copy, from the NIfTI
    header) and its frames (256 x 256 float32 per slice)."""
    import nibabel as nib

    worst = 0
    for p, n in zip(paths, n_slices):
        voxels = n * 256 * 256
        if p and Path(p).is_file():
            try:
                voxels = int(math.prod(nib.load(str(p)).shape[:3]))
            except Exception:
                pass
        worst = max(worst, voxels * 4 * 2 + n * 256 * 256 * 4)
    return worst


def plan_build_memory(*, n_slices: int, source_paths: list[str | None], source_slices: list[int], backbone: str,
                      batch_size: int, layout: str, index_type: str, coreset_ratio: float | None, shards: int,
                      calibration_slices: int = 48, workers: int = 0, local_workers: int | None = None,
                      available: int | None = None) -> MemoryPlan:
    """A bank build's memory: without Dask this process encodes, assembles and calibrates; with
    ``workers`` the workers encode (and search the shards at calibration) and this process
    assembles and calibrates."""
    d = feature_dim(layout)
    row = check_index_type(index_type)
    est = estimate_bank_memory(n_slices * GRID * GRID, layout, index_type, coreset_ratio=coreset_ratio, shards=shards)
    index = est["shard_bytes"] if shards > 1 else est["index_bytes"]
    per_slice_feats = GRID * GRID * d * 4
    volume = _volume_bytes(source_paths, source_slices)
    in_flight = volume + batch_size * per_slice_feats * 2
    if coreset_ratio is not None:
        in_flight += 2 * min(32_768, n_slices * GRID * GRID) * d * 4
    train = min(TRAIN_MAX, est["patches"]) * d * 4 if row.trained else 0
    calib = min(calibration_slices, n_slices) * per_slice_feats
    search = CALIBRATION_BATCH * GRID * GRID * TORCH_CHUNK * 4 + TORCH_CHUNK * d * 4
    model = model_bytes(backbone, batch_size)
    if workers:
        parts = {"process": PROCESS_BASE_BYTES, "index" + (" (one shard)" if shards > 1 else ""): index, "training buffer": train,
                 "calibration slices": calib, "calibration search": search if shards == 1 else 0}
        worker_parts = {"process": PROCESS_BASE_BYTES, "model": model, "source in flight": in_flight,
                        "shard search": search if shards > 1 else 0}
    else:
        parts = {"process": PROCESS_BASE_BYTES, "model": model, "source in flight": in_flight,
                 "index" + (" (one shard)" if shards > 1 else ""): index, "training buffer": train,
                 "calibration slices": calib, "calibration search": search}
        worker_parts = {}
    plan = MemoryPlan("build-bank", parts, worker_parts, workers, workers if local_workers is None else local_workers)
    plan.remedies = _build_remedies(plan, est, available, index_type, layout, coreset_ratio, shards)
    return plan


def _build_remedies(plan: MemoryPlan, est: dict, available: int | None, index_type: str, layout: str, coreset_ratio,
                    shards: int) -> list[str]:
    out = []
    index = est["index_bytes"]
    budget = (available or 0) - (plan.on_this_machine - (est["shard_bytes"] if shards > 1 else index))
    if budget > 0 and index > budget / 2:
        want = max(2, math.ceil(index / (budget / 2)))
        out.append(f"--shards {want} (one shard of about {gb(index / want)} in memory at a time)")
    elif index > 0 and shards == 1:
        out.append("--shards N (the index in N files, one in memory at a time)")
    if index_type in ("flat", "ivf"):
        out.append(f"--index {'flat-sq8' if index_type == 'flat' else 'ivf-fp16'} (index {gb(index / (4 if index_type == 'flat' else 2))})")
    if coreset_ratio is None:
        out.append(f"--coreset 0.1 (index {gb(index / 10)})")
    if layout == "paper1024":
        out.append(f"--layout mean256 (index {gb(index / 4)})")
    if plan.local_workers > 1:
        fit = max(1, int(((available or 0) - plan.here) // max(plan.per_worker, 1)))
        out.append(f"fewer workers on this machine (--dask local:{min(fit, plan.local_workers - 1)})")
    return out


def plan_run_memory(what: str, *, bank, n_slices: int, backbone: str, batch_size: int, k: int, volume_voxels: int,
                    volumes_kept: int = 1, decode_passes: int = 0, workers: int = 0, local_workers: int | None = None,
                    search_on_workers: bool = False) -> MemoryPlan:
    """``segment``'s or ``evaluate``'s memory: the model, the volume(s) (voxels, frames, embeddings
    of 2 MB per slice, maps), the index (one shard at a time when sharded: the others are
    memory-mapped) and the search's distances; ``evaluate`` keeps every unit's embeddings and its
    decode passes' logits (3 x 256 x 256 float32 per slice and pass)."""
    from .preflight import knn_search_bytes

    per_slice = 256 * 256 * 4 * 3 + 256 * 64 * 64 * 2  # frame, raw and normalised map; fp16 embedding
    shard = bank.index.shards[0].ntotal if bank.shards > 1 else bank.ntotal
    index = shard * bank.dim * check_index_type(bank.manifest["index"]["type"]).bytes_per_dim
    knn = knn_search_bytes(n_slices, k, bank.ntotal)
    model = model_bytes(backbone, batch_size)
    volumes = volume_voxels * 4 * 2 + n_slices * per_slice
    if what == "evaluate":
        volumes = volumes_kept * volume_voxels * 4 + n_slices * (per_slice + decode_passes * 3 * 256 * 256 * 4)
    if workers and what == "segment":
        parts = {"process": PROCESS_BASE_BYTES}
        worker_parts = {"process": PROCESS_BASE_BYTES, "model": model, "volume in flight": volumes, "index": index, "search": knn}
    elif workers:
        parts = {"process": PROCESS_BASE_BYTES, "model": model, "test units": volumes, "search results": knn,
                 "index": 0 if search_on_workers else index}
        worker_parts = {"process": PROCESS_BASE_BYTES, "model": model, "unit in flight": volume_voxels * 4 * 2,
                        "index": index if search_on_workers else 0}
    else:
        parts = {"process": PROCESS_BASE_BYTES, "model": model, "volumes" if what == "evaluate" else "volume": volumes,
                 "index" + (" (one shard)" if bank.shards > 1 else ""): index, "search": knn}
        worker_parts = {}
    plan = MemoryPlan(what, parts, worker_parts, workers, workers if local_workers is None else local_workers)
    plan.remedies = (["fewer workers on this machine (--dask local:N with a smaller N)"] if plan.local_workers > 1 else []) + \
        (["a sharded bank (build-bank --shards N)"] if bank.shards == 1 and index > 1e9 else []) + \
        (["fewer test subjects per run (--subjects)"] if what == "evaluate" else [])
    return plan
