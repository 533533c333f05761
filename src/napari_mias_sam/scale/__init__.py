"""Past one process: bank builds, ``segment`` batches and ``evaluate`` on a Dask cluster (a local
one, SLURM through dask-jobqueue, one worker per GPU through dask-cuda), with the results of one
process. Only this package imports ``dask.distributed``; the command line imports it only for
``--dask`` (docs/distributed.md).

    from napari_mias_sam.scale import connect, register_backbone, build_bank_on_dask
    with connect("local:2") as session:
        info = register_backbone(session, {"name": "litemedsam", "device": "auto"})
        bank = build_bank_on_dask(bank_inputs_from_files(files, preprocessing), session, info, staging=...)
"""

from __future__ import annotations

from .builds import build_bank_on_dask, register_backbone
from .cluster import BackbonePlugin, DaskSession, SchedulerSpec, connect, parse_scheduler
from .runs import evaluate_hooks, segment_on_dask
from .search import DaskShardSearcher, searcher_for_bank, searcher_for_index

__all__ = [
    "BackbonePlugin",
    "DaskSession",
    "DaskShardSearcher",
    "SchedulerSpec",
    "build_bank_on_dask",
    "connect",
    "evaluate_hooks",
    "parse_scheduler",
    "register_backbone",
    "searcher_for_bank",
    "searcher_for_index",
    "segment_on_dask",
]
