"""The normal memory bank: patch features of normal slices in a faiss index, with provenance.

A bank is a folder holding ``index.faiss`` (faiss's own binary format, which cannot run code), or
for a sharded bank (format version 2) ``index-00000-of-0000N.faiss`` ... (consecutive id ranges,
searched memory-mapped: :mod:`napari_mias_sam.bank.shards`), and ``manifest.json`` (what made it: backbone and weights hash, preprocessing, slice axis, patch
layout, counts, and the normal-score calibration). Saves are atomic; loading checks the files
against the manifest, and :func:`check_compatible` refuses a bank made with another backbone.

Size: about 480 lines: one class owns a bank's files, its manifest and every way it is searched
(CPU, bounded exact, GPU, torch, remote shards), so that each search path sees the same state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch

from ..core import defaults
from ..method.anomaly import Calibration, calibration_entry, mean_of_k_nearest
from ..core.errors import BankMismatchError, InputError
from ..method.patches import GRID, feature_dim
from ..method.preprocess import PREPROCESS_PRESETS, Preprocessing
from .manifest_schema import index_file_inside, validate_manifest
from .indexes import TRAIN_MAX, check_index_type, index_bytes, set_nprobe
from .knn import TorchSearcher
from .shards import ShardedIndex, shard_search

__all__ = [
    "BANK_FORMAT",
    "BANK_FORMAT_VERSION",
    "SHARDED_FORMAT_VERSION",
    "SliceGroup",
    "MemoryBank",
    "load_bank",
    "check_backbone_name",
    "check_compatible",
    "estimate_bank_memory",
    "bank_output",
]

BANK_FORMAT = "napari-mias-sam memory bank"
BANK_FORMAT_VERSION = 1
#: The format version of sharded banks (``index.shards`` in the manifest); one-file banks keep
#: version 1, so that earlier versions of the package still read them.
SHARDED_FORMAT_VERSION = 2
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
#: A coreset is selected within chunks of at most this many patches of one source (256 slices
#: on a GPU, 32 on a CPU): bounds the memory (1 GiB at 1,024-d) and the cost of greedy
#: selection, which grows with chunk size x kept patches (one pass over the chunk per pick).
CORESET_CHUNK = 262_144
CORESET_CHUNK_CPU = 32_768


@dataclass
class SliceGroup:
    """Normal slices from one source (a volume, or a block of a slice folder). ``load()`` returns
    them in the 256 x 256 model frame with intensities in [0, 1] and is called once, when the
    group's turn comes (so a large build never holds every slice). ``n`` is the expected count.
    Slices of one group are never used to calibrate each other (they are near-duplicates)."""

    name: str
    n: int
    #: -> (frames (N, 256, 256), skipped slices[, slice indices in the source[, extra manifest entries]])
    load: Callable[[], tuple]
    path: str | None = None  # the source file or folder, recorded in the manifest


def estimate_bank_memory(n_patches: int, layout: str = defaults.PATCH_LAYOUT, index_type: str = defaults.INDEX_TYPE, *,
                         coreset_ratio: float | None = None, shards: int = 1) -> dict:
    """Bytes a bank of ``n_patches`` encoded patches needs (after a coreset with ``coreset_ratio``).

    ``index``: the index in memory (= its file size, to a few kB) when searching on the CPU;
    ``build_peak``: the index plus what a build holds besides it (one coreset chunk of fp32
    features, or the IVF / SQ8 training buffer); ``gpu_search``: device memory of the torch GPU
    search (an fp16 copy for the distance product plus an fp32 copy for the exact re-rank).
    """
    row = check_index_type(index_type)
    d = feature_dim(layout)
    n = int(n_patches if coreset_ratio is None else math.ceil(n_patches * coreset_ratio))
    size, nlist = index_bytes(n, d, index_type)
    buffers = []
    if coreset_ratio is not None:
        buffers.append(min(n_patches, CORESET_CHUNK) * d * 4)
    if row.trained:
        buffers.append(min(n, TRAIN_MAX) * d * 4)
    return {
        "patches": n,
        "feature_dim": d,
        "index_type": index_type,
        "nlist": nlist,
        "index_bytes": size,
        "build_peak_bytes": int(size + max(buffers, default=0)),
        "gpu_search_bytes": int(n * d * (2 + 4) + n * 4),
        "shards": int(shards),
        "shard_bytes": int(math.ceil(size / max(1, shards))),
    }


class MemoryBank:
    """Patch features of normal slices behind a faiss index, and the manifest that describes them."""

    def __init__(self, index: faiss.Index, manifest: dict, path: Path | None = None) -> None:
        self.index = index
        self.manifest = manifest
        self.path = path
        self._gpu_index: faiss.Index | None = None
        self._torch: TorchSearcher | None = None
        self._remote = None  # a searcher elsewhere (Dask workers holding the shards): napari_mias_sam.scale
        if self.nprobe is not None:
            self._set_nprobe(index, self.nprobe)

    @staticmethod
    def _set_nprobe(index, nprobe: int) -> None:
        if isinstance(index, ShardedIndex):
            index.set_nprobe(nprobe)
        else:
            set_nprobe(index, nprobe)

    # -- what it is -----------------------------------------------------------------------
    @property
    def layout(self) -> str:
        return self.manifest["patch_layout"]

    @property
    def dim(self) -> int:
        return int(self.manifest["feature_dim"])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def backbone(self) -> dict:
        return self.manifest["backbone"]

    @property
    def nprobe(self) -> int | None:
        """IVF cells visited per query (from the manifest; None for flat indexes)."""
        n = self.manifest.get("index", {}).get("nprobe")
        return None if n is None else int(n)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.nprobe is None:
            raise ValueError("nprobe applies to IVF banks only")
        self.manifest["index"]["nprobe"] = int(value)
        for idx in (self.index, self._gpu_index):
            if idx is not None:
                self._set_nprobe(idx, int(value))

    @property
    def shards(self) -> int:
        """How many index files the bank has (1: one ``index.faiss``)."""
        return len(self.index) if isinstance(self.index, ShardedIndex) else 1

    @property
    def search_device(self) -> torch.device:
        """Where query features are best computed: the torch GPU search's device, else the CPU."""
        return self._torch.device if self._torch is not None else torch.device("cpu")

    @property
    def search_backend(self) -> str:
        """Where searches run: ``faiss-gpu``, ``torch-<device>`` or ``faiss-cpu``."""
        if self._remote is not None:
            return str(getattr(self._remote, "backend", "remote"))
        if self._gpu_index is not None:
            return "faiss-gpu"
        if self._torch is not None:
            return f"torch-{self._torch.device}"
        return "faiss-cpu"

    @property
    def preprocessing(self) -> dict:
        return self.manifest["preprocessing"]

    @property
    def slice_axis(self) -> str:
        return str(self.manifest.get("slice_axis", defaults.SLICE_AXIS))

    def calibration(self, k: int = defaults.K) -> Calibration:
        entry = calibration_entry(self.manifest.get("calibration"), k)
        if entry is None:
            raise BankMismatchError(
                f"{self.path or 'bank'}: holds no calibration statistics (it needs normal slices from at "
                "least one source); use --normalisation reference or rebuild the bank."
            )
        return Calibration(low=float(entry["low"]), high=float(entry["high"]))

    def summary(self) -> str:
        b = self.backbone
        cal = self.manifest.get("calibration", {})
        return (
            f"{self.ntotal:,} patches from {self.manifest['counts']['slices']} slices of "
            f"{len(self.manifest.get('sources', []))} sources; backbone {b['name']} "
            f"(weights sha256 {str(b['weights_sha256'])[:12]}"
            + (f", {b['encoding']} encoding" if "encoding" in b else "")
            + f"), layout {self.layout} ({self.dim}-d), "
            f"index {self.manifest['index']['type']}"
            + (f" in {self.shards} shards" if self.shards > 1 else "")
            + (f" (nlist {self.manifest['index']['nlist']}, nprobe {self.nprobe})" if self.nprobe is not None else "")
            + (f", coreset {self.manifest['coreset']['ratio']:g} of {self.manifest['coreset']['encoded_patches']:,} patches"
               if self.manifest.get("coreset") else "")
            + f", axis {self.slice_axis}, "
            f"preprocessing {self.manifest['preprocessing'].get('mode')}; calibration on "
            f"{cal.get('n_slices', 0)} held-out slices"
        )

    # -- searching ------------------------------------------------------------------------
    def search(self, features: np.ndarray | torch.Tensor, k: int = defaults.K, *, params: faiss.SearchParameters | None = None) -> np.ndarray:
        """Squared L2 distances (M, k) of each feature row to its k nearest bank patches."""
        on_torch = self._torch is not None and params is None
        if on_torch and isinstance(features, torch.Tensor):
            x = features  # the torch (GPU) search takes device tensors as they are
        else:
            f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
            x = np.ascontiguousarray(f, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(
                f"{self.path or 'the memory bank'} holds {self.dim}-d patch features (layout {self.layout}) but this run "
                f"made {x.shape[-1] if x.ndim == 2 else '?'}-d ones: the bank and the run disagree on the patch layout "
                f"(was manifest.json edited?); rebuild the bank (features must be (M, {self.dim}), got {tuple(x.shape)}).")
        if self.ntotal == 0:
            raise BankMismatchError("the memory bank is empty; build it from normal slices first")
        k = min(k, self.ntotal)
        if self._remote is not None and params is None:
            return self._remote.search(x, k)
        if on_torch:
            return self._torch.search(x, k)
        if params is not None or self._gpu_index is not None:
            index = self._gpu_index or self.index
            dist, _ = index.search(x, k, params=params) if params is not None else index.search(x, k)
        elif isinstance(self.index, ShardedIndex):
            dist, _ = self.index.search_nearest(x, k)  # each shard as below, merged
        else:
            # exact flat banks: the bounded search (torch_knn's distances, bit for bit), as each shard
            # of a sharded bank and each Dask worker's shard get; faiss's search otherwise
            dist, _ = shard_search(self.index, x, k)
        return np.maximum(dist, 0.0)

    def source_ranges(self) -> list[tuple[int, int]]:
        """Bank ids ``(start, stop)`` of each source's patches, in order (from the manifest)."""
        out, start = [], 0
        for src in self.manifest.get("sources", []):
            n = int(src.get("patches", 0))
            out.append((start, start + n))
            start += n
        return out

    def patch_scores(self, features: torch.Tensor | np.ndarray, k: int = defaults.K) -> np.ndarray:
        """(N, 1024, D) patch features -> (N, 32, 32) scores: mean squared L2 to the k nearest."""
        n = features.shape[0]
        d = self.search(features.reshape(-1, features.shape[-1]), k)
        return mean_of_k_nearest(d, k, axis=1).reshape(n, GRID, GRID).astype(np.float32)

    def use_gpu(self, device: torch.device | str | None = None) -> bool:
        """Search on a GPU from now on: faiss's GPU index when faiss was built with GPU support
        and sees one; else, when torch has CUDA, :class:`~napari_mias_sam.bank.knn.TorchSearcher`
        (the bank copied to ``device``, fp16 distance product with an exact fp32 re-rank; it
        searches IVF banks exhaustively, i.e. exactly). Returns False (CPU search) otherwise."""
        if self._gpu_index is not None or self._torch is not None:
            return True
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and not isinstance(self.index, ShardedIndex):
            self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
            if self.nprobe is not None:
                set_nprobe(self._gpu_index, self.nprobe)
            return True
        if torch.cuda.is_available():
            dev = torch.device(device if device is not None else "cuda")
            if dev.type == "cuda":
                self._torch = TorchSearcher(self.index, device=dev)
                return True
        return False

    def use_cpu(self) -> None:
        """Drop any GPU copy of the bank (searches go back to faiss on the CPU)."""
        self._gpu_index = None
        self._torch = None

    def use_searcher(self, searcher) -> None:
        """Search through ``searcher`` from now on (``searcher.search(x, k, exclude=None)`` ->
        distances, e.g. Dask workers that hold the shards); ``None``: search here again."""
        self._remote = searcher

    # -- saving ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False, claim=None) -> Path:
        """Write the bank folder atomically (a temporary folder moved into place) under a lock on
        its name (:class:`~napari_mias_sam.core.atomic_outputs.OutputSet`; pass ``claim`` when the caller
        claimed it before its work)."""
        target = Path(path)
        if target.exists() and not overwrite:
            raise InputError(f"{target}: already exists; choose another folder or pass --overwrite.")
        if target.exists() and not (target / MANIFEST_FILE).is_file():
            raise InputError(f"{target}: exists and is not a memory bank folder; refusing to replace it.")
        with contextlib.ExitStack() as stack:
            outs = claim if claim is not None else stack.enter_context(bank_output(target, overwrite=overwrite))
            tmp = outs.temp_dir(target.name)
            manifest = dict(self.manifest)
            if isinstance(self.index, ShardedIndex):
                entries = _write_shards(self.index, tmp)
                manifest["index"] = dict(manifest["index"], shards=entries, ntotal=self.ntotal)
                manifest["index"].pop("file", None)
                manifest["format_version"] = SHARDED_FORMAT_VERSION
            else:
                faiss.write_index(self.index, str(tmp / INDEX_FILE))
                manifest["index"] = dict(manifest["index"], file=INDEX_FILE, ntotal=self.ntotal)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            outs.commit()
        self.path = target
        return target


def _write_shards(index: ShardedIndex, folder: Path) -> list[dict]:
    """The shards into ``folder``: hard links to (else copies of) their files where they lie on
    disk (a staging area beside the bank), else written from memory."""
    import shutil

    from .shards import shard_file_name

    entries = []
    for i, shard in enumerate(index.shards):
        name = shard_file_name(i, len(index))
        dst = folder / name
        src = index.files[i] if index.files is not None else None
        if src is not None and src.is_file():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        else:
            faiss.write_index(shard, str(dst))
        entries.append({"file": name, "ntotal": int(shard.ntotal)})
    return entries


def bank_output(target: str | os.PathLike, *, overwrite: bool = False):
    """The (unclaimed) output set of a bank folder: its name in its parent folder, under a lock."""
    from ..core.atomic_outputs import OutputSet

    target = Path(target)
    return OutputSet(target.parent, [target.name], overwrite=overwrite, what="bank")


def load_bank(path: str | os.PathLike, *, mmap: bool = False) -> MemoryBank:
    """Open a bank folder; check its manifest and index agree. ``mmap`` maps large indexes."""
    path = Path(path)
    mf = path / MANIFEST_FILE
    if path.is_file():  # e.g. the bank's own manifest.json or index.faiss, given for the folder
        inside = " (it is one of a bank's files: give its folder, " + str(path.parent) + ")" if path.name in (MANIFEST_FILE, "index.faiss") else ""
        raise InputError(f"{path}: is a file, not a memory bank folder{inside}.")
    if not path.is_dir() or not mf.is_file():
        raise InputError(f"{path}: not a memory bank folder (no {MANIFEST_FILE}). Build one with 'mias-sam build-bank'.")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{mf}: is not valid JSON ({exc}); the bank is damaged, rebuild it.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
        raise InputError(f"{mf}: not a napari-mias-sam bank manifest.")
    version = manifest.get("format_version", 0)
    if isinstance(version, int) and version > SHARDED_FORMAT_VERSION:
        raise InputError(f"{path}: bank format {manifest.get('format_version')} is newer than this version of napari-mias-sam; upgrade it.")
    validate_manifest(manifest, mf)
    missing = [k for k in ("backbone", "preprocessing", "patch_layout", "feature_dim") if k not in manifest]
    try:
        want_d, want_n = int(manifest["feature_dim"]), int(manifest["index"]["ntotal"])
    except (KeyError, TypeError, ValueError):
        missing.append("index.ntotal")
    if missing:
        raise InputError(f"{mf}: lacks or garbles {', '.join(missing)}; the bank is damaged, rebuild it.")
    if manifest["index"].get("shards"):
        index = _read_shards(path, manifest, mf)
    else:
        idx_file = index_file_inside(path, manifest["index"].get("file", INDEX_FILE), mf)
        index = _read_index(idx_file, mmap)
    if index.d != want_d or index.ntotal != want_n:
        raise InputError(
            f"{path}: index ({index.ntotal} x {index.d}) does not match its manifest "
            f"({manifest['index']['ntotal']} x {manifest['feature_dim']}); rebuild the bank."
        )
    return MemoryBank(index, manifest, path)


def _read_index(idx_file: Path, mmap: bool) -> faiss.Index:
    if not idx_file.is_file():
        raise InputError(f"{idx_file}: missing; the bank folder is incomplete, rebuild it.")
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return faiss.read_index(str(idx_file), flags)
    except Exception as exc:
        raise InputError(f"{idx_file}: cannot read the faiss index ({exc}); the bank is damaged, rebuild it.") from exc


def _read_shards(path: Path, manifest: dict, mf: Path) -> ShardedIndex:
    """A sharded bank's index files, memory-mapped, each checked against its manifest entry."""
    shards, files = [], []
    for entry in manifest["index"]["shards"]:
        f = index_file_inside(path, entry["file"], mf, field="index.shards")
        shard = _read_index(f, True)
        if shard.ntotal != int(entry["ntotal"]) or shard.d != int(manifest["feature_dim"]):
            raise InputError(f"{f}: holds {shard.ntotal} x {shard.d} vectors but the manifest says {entry['ntotal']} x "
                             f"{manifest['feature_dim']}; the bank is damaged, rebuild it.")
        shards.append(shard)
        files.append(f)
    return ShardedIndex(shards, files)


def check_backbone_name(bank: MemoryBank, name: str) -> None:
    """Refuse a backbone other than the bank's by its name, before any model loads (the weights
    and the encoding are checked once it is loaded: :func:`check_compatible`)."""
    built = bank.backbone.get("name")
    if built != name:
        raise BankMismatchError(
            f"{bank.path or 'the memory bank'} was built with {built} but the selected backbone is {name}; "
            f"select {built} or build a bank with {name}."
        )


def check_compatible(bank: MemoryBank, backbone_info: dict, *, preprocessing: dict | None = None) -> None:
    """Refuse a bank made with another backbone, other weights or another encoding (its embedding
    space is different)."""
    b = bank.backbone
    where = bank.path or "the memory bank"
    if b.get("name") != backbone_info.get("name") or b.get("weights_sha256") != backbone_info.get("weights_sha256"):
        raise BankMismatchError(
            f"{where} was built with backbone {b.get('name')} (weights sha256 {str(b.get('weights_sha256'))[:12]}), "
            f"but the selected backbone is {backbone_info.get('name')} (weights sha256 "
            f"{str(backbone_info.get('weights_sha256'))[:12]}). Embeddings of different backbones or weights are not "
            f"comparable: select {b.get('name')} with the same weights, or rebuild the bank with the selected backbone."
        )
    from ..method.reference_encoding import encoding_of

    if encoding_of(b) != encoding_of(backbone_info):
        raise BankMismatchError(
            f"{where} was built with the '{encoding_of(b)}' encoding but the selected backbone uses "
            f"'{encoding_of(backbone_info)}'; embeddings of the two encodings are not comparable: run with the bank's "
            f"encoding ('{encoding_of(b)}') or rebuild the bank with '{encoding_of(backbone_info)}'."
        )
    if preprocessing is not None and preprocessing.get("mode") != bank.preprocessing.get("mode"):
        raise BankMismatchError(
            f"{where} was built with '{bank.preprocessing.get('mode')}' preprocessing but this run uses "
            f"'{preprocessing.get('mode')}'; use the bank's preprocessing or rebuild the bank."
        )


def preprocessing_from_bank(bank: MemoryBank) -> Preprocessing:
    """The intensity preprocessing the bank was built with (runs must use the same): a bank of PNG
    slices gets the ``minmax-slice`` preset; a field the manifest lacks, the :class:`Preprocessing`
    default."""
    p = dict(bank.preprocessing)
    if p.get("mode") not in ("mri", "ct", "minmax"):
        return PREPROCESS_PRESETS["minmax-slice"]
    d = Preprocessing(mode=p["mode"])
    return Preprocessing(
        mode=d.mode,
        percentiles=tuple(p.get("percentiles", d.percentiles)),
        window=tuple(p.get("window", d.window)),
        scope=p.get("scope", d.scope),
    )
