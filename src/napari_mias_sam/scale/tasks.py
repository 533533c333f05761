"""What runs on a Dask worker: stage one bank source, segment one volume, encode one test unit,
search one shard. Each task reads its inputs from files (the staging area, the bank folder, the
volumes) and writes its large outputs to files, so the scheduler carries only small messages.

The backbone is the one :class:`~napari_mias_sam.scale.cluster.BackbonePlugin` loaded in the
worker; banks and shards are opened once per worker (memory-mapped) and kept while the worker lives.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch

from .cluster import search_threads, task_threads, worker_backbone

__all__ = ["backbone_info", "stage_source_task", "shard_search_task", "staged_query_search_task", "encode_unit_task",
           "segment_volume_task", "open_shard", "open_bank", "worker_pid"]

_SHARDS: dict[tuple[str, int], object] = {}
_BANKS: dict[tuple[str, int], object] = {}


def worker_pid(dask_worker=None) -> int:
    return os.getpid()


def _mtime(path: str | os.PathLike) -> int:
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0


def open_shard(path: str, nprobe: int | None = None):
    """A shard (or a one-file bank's index), memory-mapped, opened once per worker."""
    key = (str(path), _mtime(path))
    if key not in _SHARDS:
        from ..bank.shards import read_shard

        _SHARDS[key] = read_shard(path)
    index = _SHARDS[key]
    if nprobe is not None:
        from ..bank.indexes import set_nprobe

        set_nprobe(index, int(nprobe))
    return index


def open_bank(path: str):
    """A bank folder, opened once per worker (shards memory-mapped)."""
    key = (str(path), _mtime(Path(path) / "manifest.json"))
    if key not in _BANKS:
        from ..bank import load_bank

        bank = load_bank(path)
        search = bank.search

        def threaded_search(*args, **kwargs):  # the pipeline's searches with the driver's faiss threads
            with search_threads():
                return search(*args, **kwargs)

        bank.search = threaded_search
        _BANKS[key] = bank
    return _BANKS[key]


def backbone_info(dask_worker=None) -> dict:
    """The worker's backbone: its manifest description, precision and device (``Client.run``)."""
    bb = worker_backbone(dask_worker)
    return {"describe": bb.describe(), "precision": getattr(bb, "precision", "fp32"),
            "device": str(getattr(bb, "device", "cpu")), "host": socket.gethostname(), "pid": os.getpid()}


def _encoder(cache_root: str | None):
    bb = worker_backbone()
    if cache_root is None:
        return bb, bb.encode
    from ..pipeline.embedding_cache import EmbeddingCache, cached_encoder

    return bb, cached_encoder(bb, EmbeddingCache(cache_root))


def stage_source_task(staging: str, gi: int, group, plan, fingerprint: dict, cache_root: str | None = None) -> dict:
    """Encode bank source ``gi`` into the staging area (features on disk); returns its counts."""
    from ..bank.staging import StagingArea, stage_source

    bb, encode = _encoder(cache_root)
    out = stage_source(StagingArea(staging), gi, group, plan, encode, fingerprint, device=getattr(bb, "device", None))
    return {**out, "pid": os.getpid()}


def shard_search_task(path: str, feats: np.ndarray, k: int, exclude, exact: bool, nprobe: int | None = None,
                      bounded: bool | None = None):
    """:func:`~napari_mias_sam.bank.shards.shard_search` of one shard: ``(D, I)``, ids local (I None
    for a flat shard's bounded search). ``bounded``: the driver's ``MIAS_SAM_BOUNDED_KNN`` choice
    (None: this worker's). The shard's bounded searcher is kept with the shard (per worker)."""
    from ..bank.shards import shard_search

    task_threads()
    index = open_shard(path, nprobe)
    with search_threads():
        return shard_search(index, feats, k, exclude=exclude, exact=exact, bounded=bounded)


def staged_query_search_task(path: str, embeddings: str, b0: int, b1: int, layout: str, k: int, nprobe: int | None = None,
                             bounded: bool | None = None):
    """Search one shard with the patch features of slices ``b0:b1`` of a staged embeddings file
    (the features are made here, as the pipeline makes them: nothing large crosses the scheduler),
    as :func:`~napari_mias_sam.bank.shards.shard_search` searches it (``bounded`` as in
    :func:`shard_search_task`)."""
    from ..bank.shards import shard_search
    from ..method.patches import patch_features

    task_threads()
    emb = np.load(embeddings, mmap_mode="r", allow_pickle=False)
    feats = patch_features(torch.from_numpy(np.array(emb[b0:b1])).float(), layout)
    x = feats.reshape(-1, feats.shape[-1]).numpy()
    index = open_shard(path, nprobe)
    with search_threads():
        return shard_search(index, x, min(k, index.ntotal), bounded=bounded)


def encode_unit_task(frames: torch.Tensor, out: str, cache_root: str | None, batch_size: int) -> tuple[int, ...]:
    """Encode one test unit's frames as the pipeline does (``cached_encode``) and write the
    embeddings to ``out`` (``.npy``, their own dtype); returns their shape."""
    from ..pipeline.embedding_cache import EmbeddingCache
    from ..pipeline.segment import cached_encode

    bb = worker_backbone()
    emb = cached_encode(frames, bb, EmbeddingCache(cache_root) if cache_root else None, batch_size=batch_size)[0]
    arr = emb.numpy()
    tmp = Path(out).with_name(f".{Path(out).name}.{os.getpid()}.part")
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    os.replace(tmp, out)
    return tuple(arr.shape)


def segment_volume_task(job, bank_path: str, settings, rule_args: tuple, axis, temps: dict[str, str], cache_root: str | None,
                        batch_size: int) -> dict:
    """``segment`` of one volume on a worker, the steps of :func:`~napari_mias_sam.jobs.run.run`
    (the volume read, masked to the bank's ROI, the run set up with the worker's backbone and
    segmented): the outputs are written to the driver's temporary files ``temps`` (the driver
    holds their claim and commits them); returns the volume's report."""
    from ..jobs.outputs import segment_job
    from ..jobs.run import roi_for_bank
    from ..pipeline.embedding_cache import EmbeddingCache
    from ..pipeline.segment import setup_run

    bank = open_bank(bank_path)
    setup = setup_run(bank, worker_backbone(), settings)
    cache = EmbeddingCache(cache_root) if cache_root else None

    def segment():
        image, labels = job.load()
        image = roi_for_bank(image, bank.manifest, labels=labels, case=job.case)
        return setup.segment(image, axis=axis, cache=cache, batch_size=batch_size), labels

    return segment_job(job, segment, rule_args, files={k: Path(v) for k, v in temps.items()})
