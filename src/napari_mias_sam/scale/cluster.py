"""Connecting to Dask: ``--dask local``, ``local:N``, a scheduler address (``tcp://host:8786``) or a
scheduler file (``scheduler.json``, as ``dask scheduler --scheduler-file`` and dask-jobqueue write
it), and the worker plugin that loads the backbone once per worker.

Local clusters follow dask-cuda's conventions: one worker per GPU when there are GPUs (dask-cuda's
``LocalCUDACluster`` when it is installed, else worker processes whose ``CUDA_VISIBLE_DEVICES``
starts with their own GPU, as it sets them), each with one task thread; on a CPU, ``local:N``
worker processes share the cores (torch and ONNX Runtime threads = cores / N). Every worker's
faiss uses this process's thread count on a local cluster: exact (BLAS) searches then give
bit-identical distances to a run in one process (BLAS cuts the work by thread count).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from distributed import Client, LocalCluster, WorkerPlugin, get_worker

from ..core.errors import InputError

__all__ = ["SchedulerSpec", "parse_scheduler", "DaskSession", "connect", "BackbonePlugin", "worker_backbone", "backbone_spec", "task_threads", "search_threads",
           "PLUGIN_NAME", "CONNECT_TIMEOUT_S", "local_gpu_count"]

#: Seconds to wait for a scheduler at an address before saying it is not there.
CONNECT_TIMEOUT_S = 5.0
PLUGIN_NAME = "napari-mias-sam-backbone"
_LOCAL = re.compile(r"^local(?::(\d+))?$")
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$|^[\w.\-]+:\d+$")


@dataclass(frozen=True)
class SchedulerSpec:
    """What ``--dask`` asked for: a local cluster of ``workers`` (None: one per GPU, else per
    core), or a running scheduler at ``address`` / described by ``scheduler_file``."""

    text: str
    local: bool
    workers: int | None = None
    address: str | None = None
    scheduler_file: str | None = None


def parse_scheduler(text: str) -> SchedulerSpec:
    """Read ``--dask``; a one-line :class:`InputError` for anything else."""
    t = str(text).strip()
    m = _LOCAL.match(t)
    if m:
        n = int(m.group(1)) if m.group(1) else None
        if n is not None and n < 1:
            raise InputError(f"--dask {t}: a local cluster needs at least one worker (local:1, local:2, ...).")
        return SchedulerSpec(t, True, workers=n)
    if t.endswith(".json"):
        if not Path(t).is_file():
            raise InputError(f"--dask {t}: no such scheduler file; give the file that 'dask scheduler --scheduler-file' wrote, "
                             "a scheduler address (tcp://host:8786) or local:N.")
        return SchedulerSpec(t, False, scheduler_file=t)
    if _ADDRESS.match(t):
        return SchedulerSpec(t, False, address=t if "://" in t else f"tcp://{t}")
    raise InputError(f"--dask {t!r}: not a scheduler; use local, local:N (N worker processes on this machine), a scheduler "
                     "address such as tcp://host:8786, or a scheduler file (scheduler.json).")


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class DaskSession:
    """An open client (and the local cluster it started, if any)."""

    spec: SchedulerSpec
    client: Client
    cluster: object | None = None
    threads: int | None = None  # torch / ONNX Runtime threads per local worker
    faiss_threads: int | None = None  # faiss threads of the workers on this machine (this process's)
    notes: list[str] = field(default_factory=list)

    @property
    def workers(self) -> list[str]:
        """Addresses of the workers now connected, in a fixed order."""
        return sorted(self.client.scheduler_info(n_workers=-1)["workers"])

    @property
    def local_workers(self) -> int:
        """Workers on this machine (a local cluster's, or a scheduler's workers at a loopback or
        this host's address): they share its memory with this process."""
        if self.spec.local:
            return len(self.workers)
        here = {"127.0.0.1", "localhost", "::1"}
        with contextlib.suppress(OSError):
            here.add(socket.gethostbyname(socket.gethostname()))
        hosts = [urlsplit(a).hostname for a in self.workers]
        return sum(h in here for h in hosts)

    def worker_memory_limits(self) -> dict[str, int]:
        """Each worker's memory limit in bytes (0: none set)."""
        return {a: int(w.get("memory_limit") or 0) for a, w in self.client.scheduler_info(n_workers=-1)["workers"].items()}

    @property
    def dashboard(self) -> str | None:
        try:
            import bokeh  # noqa: F401  (the dashboard needs it)
        except ImportError:
            return None
        return self.client.dashboard_link

    def describe(self) -> str:
        n = len(self.workers)
        where = (f"a local cluster of {n} worker process{'es' if n != 1 else ''}" + (f", {self.threads} thread(s) each" if self.threads else "")
                 if self.spec.local else f"the scheduler {self.client.scheduler.address} ({n} workers)")
        dash = self.dashboard
        return (f"Dask: {where}; dashboard " + (dash if dash else "not available (pip install bokeh, or napari-mias-sam[dask])")
                + "".join(f"; {x}" for x in self.notes))

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()

    def __enter__(self) -> "DaskSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _local_cluster(spec: SchedulerSpec, *, dashboard_address: str | None, memory_limit) -> tuple[object, int, list[str]]:
    """A local cluster: (cluster, threads per worker, notes)."""
    cores = os.cpu_count() or 1
    gpus = local_gpu_count()
    n = spec.workers or (gpus if gpus else max(1, min(cores, 8)))
    threads = max(1, cores // n)
    notes = []
    common = dict(n_workers=n, threads_per_worker=1, host="127.0.0.1", dashboard_address=dashboard_address,
                  memory_limit=memory_limit, silence_logs=logging.ERROR)
    if gpus:
        try:
            from dask_cuda import LocalCUDACluster

            if n <= gpus:
                kw = {k: v for k, v in common.items() if k != "host"}
                return LocalCUDACluster(CUDA_VISIBLE_DEVICES=list(range(n)), **kw), threads, ["dask-cuda: one GPU per worker"]
            notes.append(f"{n} workers on {gpus} GPU(s): GPUs shared round-robin")
        except ImportError:
            notes.append(f"{gpus} GPU(s): CUDA_VISIBLE_DEVICES set per worker (dask-cuda not installed)")
        except Exception as exc:  # dask-cuda present but unusable here (no NVML, ...)
            notes.append(f"dask-cuda not usable ({exc}); CUDA_VISIBLE_DEVICES set per worker")
        from distributed import Nanny, Scheduler, SpecCluster

        workers = {}
        for i in range(n):
            g = i % gpus
            order = ",".join(str((g + j) % gpus) for j in range(gpus))  # dask-cuda's rotation: the worker's GPU first
            workers[i] = {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "memory_limit": memory_limit,
                                                     "env": {"CUDA_VISIBLE_DEVICES": order}, "silence_logs": logging.ERROR}}
        scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": dashboard_address}}
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR), threads, notes
    return LocalCluster(processes=True, **common), threads, notes


def connect(text: str, *, timeout: float = CONNECT_TIMEOUT_S, dashboard_address: str | None = ":8787",
            memory_limit="auto") -> DaskSession:
    """Open ``--dask``'s scheduler (starting a local cluster for ``local``/``local:N``). A
    scheduler that cannot be reached within ``timeout`` seconds is a one-line :class:`InputError`."""
    import faiss

    spec = parse_scheduler(text)
    if spec.local:
        try:
            cluster, threads, notes = _local_cluster(spec, dashboard_address=dashboard_address, memory_limit=memory_limit)
        except Exception as exc:
            raise InputError(f"--dask {spec.text}: could not start a local Dask cluster ({exc}).") from exc
        client = Client(cluster)
        return DaskSession(spec, client, cluster, threads=threads, faiss_threads=faiss.omp_get_max_threads(), notes=notes)
    try:
        if spec.scheduler_file:
            client = Client(scheduler_file=spec.scheduler_file, timeout=f"{timeout}s")
        else:
            client = Client(spec.address, timeout=f"{timeout}s")
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"--dask {spec.text}: no Dask scheduler answered within {timeout:g} s ({reason}); start one "
                         "(dask scheduler, or a dask-jobqueue cluster) or use --dask local:N.") from None
    if not client.scheduler_info(n_workers=-1)["workers"]:
        try:
            client.wait_for_workers(1, timeout=timeout * 6)
        except (TimeoutError, OSError):
            client.close()
            raise InputError(f"--dask {spec.text}: the scheduler has no workers; start some (dask worker {spec.address or ''}) "
                             "and run again.") from None
    return DaskSession(spec, client, faiss_threads=faiss.omp_get_max_threads())


# -- the backbone on the workers ------------------------------------------------------------------
class BackbonePlugin(WorkerPlugin):
    """Loads the backbone once per worker (and again on a worker that replaces a dead one).

    ``spec``: ``load_backbone``'s arguments (``name``, ``checkpoint``, ``device``, ``precision``,
    ``encoding``), or a callable returning a backbone (tests). A CUDA device becomes the worker's
    own GPU (``cuda``: device 0 of its ``CUDA_VISIBLE_DEVICES``). ``threads``: torch / ONNX Runtime
    threads, set before the model loads (None: the worker's default). ``faiss_threads``: faiss's
    threads on workers of this machine (this process's count: exact searches are then
    bit-identical to its own); workers elsewhere keep theirs."""

    name = PLUGIN_NAME

    def __init__(self, spec: dict | Callable, *, threads: int | None = None, faiss_threads: int | None = None) -> None:
        self.spec = spec
        self.threads = threads
        self.faiss_threads = faiss_threads
        self.host = socket.gethostname()
        self.backbone = None

    def apply_threads(self) -> None:
        """Set torch's (and ONNX Runtime's) thread count in the calling thread: tasks run in the
        worker's executor threads, not where ``setup`` ran."""
        import torch

        if self.threads and torch.get_num_threads() != int(self.threads):
            torch.set_num_threads(int(self.threads))

    @contextlib.contextmanager
    def search_threads(self):
        """faiss's thread count for the searches inside the block, on workers of the driver's
        machine (set around each search: torch resets OpenMP's per-thread count when it first
        runs in a thread, and faiss shares it)."""
        if not self.faiss_threads or socket.gethostname() != self.host:
            yield
            return
        import faiss

        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(int(self.faiss_threads))
        try:
            yield
        finally:
            faiss.omp_set_num_threads(before)

    def setup(self, worker) -> None:
        self.apply_threads()
        if callable(self.spec):
            self.backbone = self.spec()
            return
        from ..backbones import load_backbone

        spec = dict(self.spec)
        dev = str(spec.get("device") or "auto")
        if dev.startswith("cuda"):
            spec["device"] = "cuda"  # this worker's GPU (dask-cuda puts it first in CUDA_VISIBLE_DEVICES)
        self.backbone = load_backbone(spec.pop("name"), spec.pop("checkpoint", None), spec.pop("device", None), **spec)

    def teardown(self, worker) -> None:
        self.backbone = None


def backbone_spec(name: str, checkpoint=None, device: str | None = "auto", *, precision: str = "fp32",
                  encoding: str = "standard") -> dict | Callable:
    """What :class:`BackbonePlugin` loads on every worker: ``load_backbone``'s arguments (the
    checkpoint file must be readable there too)."""
    return {"name": name, "checkpoint": None if checkpoint is None else str(checkpoint), "device": device,
            "precision": precision, "encoding": encoding}


def worker_backbone(worker=None):
    """The backbone :class:`BackbonePlugin` loaded in this worker (``worker``: for functions run
    outside a task, ``Client.run``'s ``dask_worker``)."""
    plugin = (worker or get_worker()).plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.backbone is None:
        raise RuntimeError("no backbone on this Dask worker: register napari_mias_sam.scale.BackbonePlugin first")
    if worker is None:
        plugin.apply_threads()
    return plugin.backbone


def task_threads() -> None:
    """A task's torch thread count, as :class:`BackbonePlugin` asks (tasks that do not need the backbone)."""
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if plugin is not None:
        plugin.apply_threads()


def search_threads():
    """:meth:`BackbonePlugin.search_threads` of this worker (a do-nothing block without the plugin)."""
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    return plugin.search_threads() if plugin is not None else contextlib.nullcontext()
