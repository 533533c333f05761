"""A bank built on Dask workers: every source is a task that encodes it with the worker's backbone
and writes its patch features into the bank's staging area (a shared folder), then this process
assembles them in source order (the same bank whatever the number of workers) and calibrates,
with the shards searched by the workers.

A task whose worker dies is run again elsewhere by Dask (its half-written files have temporary
names); an interrupted run leaves whole staged sources, which ``resume`` reuses.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

from distributed import as_completed

from ..core import defaults
from ..bank import MemoryBank
from ..bank.build import make_plan
from ..bank.staging import build_bank_staged
from ..core.errors import InputError
from ..jobs.bank_builds import BankInputs
from .cluster import BackbonePlugin, DaskSession
from .search import DaskShardSearcher
from .tasks import backbone_info, stage_source_task

__all__ = ["register_backbone", "build_bank_on_dask"]


def register_backbone(session: DaskSession, spec: dict | Callable) -> dict:
    """Load the backbone on every worker (now and on workers that join later); returns one
    worker's description of it (``describe``, ``precision``, ``device``), checked the same on all."""
    plugin = BackbonePlugin(spec, threads=session.threads, faiss_threads=session.faiss_threads)
    try:
        session.client.register_plugin(plugin, name=plugin.name)
    except Exception as exc:
        raise InputError(f"the backbone could not be loaded on the Dask workers: {exc}") from exc
    infos = session.client.run(backbone_info)
    if not infos:
        raise InputError("no Dask worker is connected; start workers and run again.")
    first = next(iter(infos.values()))
    for addr, info in infos.items():
        if info["describe"].get("weights_sha256") != first["describe"].get("weights_sha256"):
            raise InputError(f"Dask worker {addr} loaded other backbone weights than the others; give every worker the same "
                             "--checkpoint file.")
    first["devices"] = sorted({i["device"] for i in infos.values()})
    return first


def build_bank_on_dask(
    inputs: BankInputs,
    session: DaskSession,
    backbone: dict,
    *,
    staging: str | os.PathLike,
    layout: str = defaults.PATCH_LAYOUT,
    index_type: str = defaults.INDEX_TYPE,
    batch_size: int = defaults.BATCH_SIZE,
    coreset_ratio: float | None = None,
    shards: int = 1,
    resume: bool = False,
    cache_root: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> MemoryBank:
    """Build the bank of ``inputs`` on the session's workers (``backbone``: what
    :func:`register_backbone` returned). ``staging`` must be visible to every worker. The caller
    saves the bank and then removes ``staging``."""
    on_gpu = all(d.startswith("cuda") for d in backbone.get("devices", [backbone["device"]]))
    plan = make_plan(inputs.groups, layout=layout, index_type=index_type, preprocessing=inputs.preprocessing,
                     slice_axis=inputs.slice_axis, batch_size=batch_size, coreset_ratio=coreset_ratio, shards=shards, on_gpu=on_gpu)
    client = session.client
    groups = inputs.groups

    def run_sources(todo: list[int], fingerprints: list[dict]) -> None:
        # largest sources first: the last tasks are the short ones (the order does not change the bank)
        order = sorted(range(len(todo)), key=lambda j: -groups[todo[j]].n)
        run = uuid.uuid4().hex[:8]
        futures = {}
        for j in order:
            gi = todo[j]
            fut = client.submit(stage_source_task, str(staging), gi, groups[gi], plan, fingerprints[j], cache_root,
                                key=f"stage-source-{gi:05d}-{run}", pure=False)
            futures[fut] = gi
        done = 0
        try:
            for fut in as_completed(list(futures)):
                fut.result()  # a task's own error (a bad file) stops the build with its message
                done += 1
                if progress:
                    progress(f"encode normal sources on {len(session.workers)} Dask workers", done, len(futures))
        except BaseException:
            client.cancel(list(futures))
            raise

    def searcher_for(files, sizes, ivf: bool) -> DaskShardSearcher:
        return DaskShardSearcher(client, files, sizes, ivf=ivf)

    return build_bank_staged(groups, plan, Path(staging), backbone_info=backbone["describe"], precision=backbone["precision"],
                             resume=resume, context=inputs.context, run_sources=run_sources, searcher_for=searcher_for,
                             progress=progress, log=log)
