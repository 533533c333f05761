"""The faiss index types a bank can use, in one table: factory, memory model and options.

Every other place (the bank's build and memory estimate, the CLI's ``--index`` choices, the
benchmark's CPU indexes) reads :data:`INDEX_TABLE`; adding an index type is one row here (and a
test in ``tests/bank/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from ..core.errors import InputError

__all__ = [
    "IndexType",
    "INDEX_TABLE",
    "INDEX_TYPES",
    "TRAIN_MAX",
    "IndexSink",
    "check_index_type",
    "new_index",
    "trained_index",
    "index_bytes",
    "ivf_nlist",
    "ivf_default_nprobe",
    "set_nprobe",
]


@dataclass(frozen=True)
class IndexType:
    """One faiss index type.

    ``factory``: the :func:`faiss.index_factory` description (``{nlist}`` is filled in for IVF);
    ``bytes_per_dim``: stored bytes per vector component (the memory model: a vector costs
    ``d * bytes_per_dim``, IVF adds an int64 id per vector and ``nlist`` fp32 centroids);
    ``trained``: trained on the first :data:`TRAIN_MAX` vectors of a build before any is added;
    ``inverted_file``: approximate search with options ``nlist`` (cells) and ``nprobe`` (cells
    visited per query), both recorded in the bank's manifest.
    """

    name: str
    factory: str
    bytes_per_dim: int
    trained: bool
    inverted_file: bool
    help: str


#: faiss index types: exact flat L2 in fp32 / fp16 / 8-bit scalar quantisation, and inverted
#: files (IVF: a coarse k-means partition; a search visits ``nprobe`` of ``nlist`` cells).
INDEX_TABLE: dict[str, IndexType] = {
    t.name: t
    for t in (
        IndexType("flat", "Flat", 4, False, False, "exact, fp32; the default"),
        IndexType("flat-fp16", "SQfp16", 2, False, False, "every vector searched, stored in 2 bytes per value"),
        IndexType("flat-sq8", "SQ8", 1, True, False, "every vector searched, stored in 1 byte per value"),
        IndexType("ivf", "IVF{nlist},Flat", 4, True, True, "inverted file: approximate, faster on large banks"),
        IndexType("ivf-fp16", "IVF{nlist},SQfp16", 2, True, True, "inverted file over fp16 vectors"),
    )
}
INDEX_TYPES: tuple[str, ...] = tuple(INDEX_TABLE)
#: Vectors buffered at the start of a build to train SQ8 / IVF indexes (1 GiB at 1,024-d fp32).
TRAIN_MAX = 262_144


def check_index_type(index_type: str) -> IndexType:
    """The table row of ``index_type``; a one-line :class:`InputError` for an unknown name."""
    try:
        return INDEX_TABLE[index_type]
    except KeyError:
        raise InputError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}") from None


def new_index(d: int, index_type: str) -> faiss.Index:
    """An empty index of a type that needs no training (``flat`` and ``flat-fp16``)."""
    row = check_index_type(index_type)
    if row.trained:
        raise InputError(f"index type {index_type!r} must be trained first")
    if row.factory == "Flat":
        return faiss.IndexFlatL2(d)
    return faiss.index_factory(d, row.factory, faiss.METRIC_L2)


def ivf_nlist(expected: int, n_train: int) -> int:
    """IVF cells for a bank of about ``expected`` vectors: 4 sqrt(N) (faiss's guideline), at most
    one cell per 39 training vectors (fewer leaves k-means cells empty)."""
    return int(max(1, min(round(4 * math.sqrt(max(expected, 1))), n_train // 39)))


def ivf_default_nprobe(nlist: int) -> int:
    """Cells visited per query by default: 1/8 of them, at least 8 and at most 256."""
    return int(min(nlist, max(8, min(256, math.ceil(nlist / 8)))))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set ``nprobe`` on an IVF index (CPU or GPU, plain or wrapped); no-op for flat indexes."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)
        return
    gpu_params = getattr(faiss, "GpuParameterSpace", None)
    if gpu_params is not None:
        try:  # a GPU IVF index (or replicas of one)
            gpu_params().set_index_parameter(index, "nprobe", int(nprobe))
        except Exception:
            pass  # not an IVF index: nothing to set


def trained_index(d: int, index_type: str, data: np.ndarray, expected: int) -> tuple[faiss.Index, dict]:
    """A new SQ8 / IVF index trained on ``data`` (at most :data:`TRAIN_MAX` rows of it, evenly
    spread), and what the manifest records about it."""
    row = check_index_type(index_type)
    if len(data) > TRAIN_MAX:
        data = data[np.linspace(0, len(data) - 1, TRAIN_MAX).round().astype(np.int64)]
    info: dict = {"trained_on": int(len(data))}
    desc = row.factory
    if row.inverted_file:
        nlist = ivf_nlist(expected, len(data))
        desc = desc.format(nlist=nlist)
        info.update(nlist=nlist, nprobe=ivf_default_nprobe(nlist))
    index = faiss.index_factory(d, desc, faiss.METRIC_L2)
    index.train(np.ascontiguousarray(data, dtype=np.float32))
    if "nprobe" in info:
        set_nprobe(index, info["nprobe"])
    return index, info


def index_bytes(n: int, d: int, index_type: str) -> tuple[int, int | None]:
    """Bytes of an index holding ``n`` vectors of dimension ``d`` (its memory = its file size, to a
    few kB), and its ``nlist`` (``None`` for flat types)."""
    row = check_index_type(index_type)
    size = n * d * row.bytes_per_dim
    nlist = None
    if row.inverted_file:
        nlist = ivf_nlist(n, min(n, TRAIN_MAX))
        size += n * 8 + nlist * d * 4  # inverted-list ids (int64) + centroids
    return int(size), nlist


class IndexSink:
    """Receives a build's patch vectors in order (ids are assigned in that order). Index types
    that need training buffer exactly the first ``min(TRAIN_MAX, expected)`` vectors, train on
    them, then stream like the flat ones: the index does not depend on how the vectors were cut
    into blocks (a build from staged sources adds them in other blocks than a streaming one)."""

    def __init__(self, d: int, index_type: str, expected: int) -> None:
        row = check_index_type(index_type)
        self.d, self.index_type, self.expected = d, index_type, max(int(expected), 1)
        self.info: dict = {}
        self.index: faiss.Index | None = None if row.trained else new_index(d, index_type)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.count = 0

    @property
    def trained(self) -> bool:
        return self.index is not None

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.d)
        self.count += len(x)
        if not self.trained:
            room = min(TRAIN_MAX, self.expected) - self._buffered
            self._buffer.append(x[:room])
            self._buffered += len(x[:room])
            if self._buffered < min(TRAIN_MAX, self.expected):
                return
            self._train()
            x = x[room:]
        if len(x):
            self._place(x)

    def _place(self, x: np.ndarray) -> None:
        """Add vectors to the (trained) index."""
        assert self.index is not None
        self.index.add(x)

    def _train(self) -> None:
        data = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        self.index, self.info = trained_index(self.d, self.index_type, data, self.expected)
        self._after_training()
        self._place(data)

    def _after_training(self) -> None:
        """Hook: the trained (empty) index is in ``self.index``."""

    def finish(self) -> faiss.Index | None:
        if not self.trained and self._buffered:
            self._train()
        return self.index
