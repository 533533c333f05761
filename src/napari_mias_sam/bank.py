"""The normal memory bank: patch features of normal slices in a faiss index, with provenance.

A bank is a folder holding ``index.faiss`` (faiss's own binary format, which cannot run code)
and ``manifest.json`` (what made it: backbone and weights hash, preprocessing, slice axis, patch
layout, counts, and the normal-score calibration). Saves are atomic; loading checks the files
against the manifest, and :func:`check_compatible` refuses a bank made with another backbone.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import faiss
import numpy as np
import torch

from .anomaly import Calibration, maps_from_scores
from .errors import BankMismatchError, Cancelled, InputError
from .knn import torch_knn
from .patches import GRID, feature_dim, patch_features
from .settings import PATCH_LAYOUTS

__all__ = [
    "BANK_FORMAT",
    "BANK_FORMAT_VERSION",
    "SliceGroup",
    "MemoryBank",
    "build_bank",
    "load_bank",
    "check_compatible",
]

BANK_FORMAT = "napari-mias-sam memory bank"
BANK_FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
INDEX_TYPES = ("flat", "flat-fp16")
CALIBRATION_KS = (1, 2, 3, 4, 5)

ProgressFn = Callable[[str, int, int], None]


@dataclass
class SliceGroup:
    """Normal slices from one source (a volume, or a block of a slice folder). ``load()`` returns
    them in the 256 x 256 model frame with intensities in [0, 1] and is called once, when the
    group's turn comes (so a large build never holds every slice). ``n`` is the expected count.
    Slices of one group are never used to calibrate each other (they are near-duplicates)."""

    name: str
    n: int
    load: Callable[[], tuple[torch.Tensor, int]]  # -> (frames (N, 256, 256), skipped empty slices)


def _new_index(d: int, index_type: str) -> faiss.Index:
    if index_type == "flat":
        return faiss.IndexFlatL2(d)
    if index_type == "flat-fp16":
        return faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    raise InputError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")


class MemoryBank:
    """Patch features of normal slices behind a faiss index, and the manifest that describes them."""

    def __init__(self, index: faiss.Index, manifest: dict, path: Path | None = None) -> None:
        self.index = index
        self.manifest = manifest
        self.path = path
        self._gpu_index: faiss.Index | None = None

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
    def preprocessing(self) -> dict:
        return self.manifest["preprocessing"]

    @property
    def slice_axis(self) -> str:
        return str(self.manifest.get("slice_axis", "axial"))

    def calibration(self, k: int = 1) -> Calibration:
        cal = self.manifest.get("calibration") or {}
        per_k = cal.get("per_k", {})
        if not per_k:
            raise BankMismatchError(
                f"{self.path or 'bank'}: holds no calibration statistics (it needs normal slices from at "
                "least one source); use --normalisation reference or rebuild the bank."
            )
        key = str(k) if str(k) in per_k else str(max(int(x) for x in per_k if int(x) <= max(k, 1)))
        return Calibration(low=float(per_k[key]["low"]), high=float(per_k[key]["high"]))

    def summary(self) -> str:
        b = self.backbone
        cal = self.manifest.get("calibration", {})
        return (
            f"{self.ntotal:,} patches from {self.manifest['counts']['slices']} slices of "
            f"{len(self.manifest.get('sources', []))} sources; backbone {b['name']} "
            f"(weights sha256 {str(b['weights_sha256'])[:12]}), layout {self.layout} ({self.dim}-d), "
            f"index {self.manifest['index']['type']}, axis {self.slice_axis}, "
            f"preprocessing {self.manifest['preprocessing'].get('mode')}; calibration on "
            f"{cal.get('n_slices', 0)} held-out slices"
        )

    # -- searching ------------------------------------------------------------------------
    def search(self, features: np.ndarray, k: int = 1, *, params: faiss.SearchParameters | None = None) -> np.ndarray:
        """Squared L2 distances (M, k) of each feature row to its k nearest bank patches."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (M, {self.dim}), got {x.shape}")
        if self.ntotal == 0:
            raise BankMismatchError("the memory bank is empty; build it from normal slices first")
        k = min(k, self.ntotal)
        index = self._gpu_index or self.index
        dist, _ = index.search(x, k, params=params) if params is not None else index.search(x, k)
        return np.maximum(dist, 0.0)

    def patch_scores(self, features: torch.Tensor | np.ndarray, k: int = 1) -> np.ndarray:
        """(N, 1024, D) patch features -> (N, 32, 32) scores: mean squared L2 to the k nearest."""
        f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        n = f.shape[0]
        d = self.search(f.reshape(-1, f.shape[-1]), k)
        return d.mean(axis=1).reshape(n, GRID, GRID).astype(np.float32)

    def use_gpu(self) -> bool:
        """Move the index to the GPU(s) when faiss was built with GPU support and sees one."""
        if self._gpu_index is not None:
            return True
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
            return True
        return False

    # -- saving ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the bank folder atomically (a temporary folder renamed into place)."""
        target = Path(path)
        if target.exists() and not overwrite:
            raise InputError(f"{target}: already exists; choose another folder or pass --overwrite.")
        if target.exists() and not (target / MANIFEST_FILE).is_file():
            raise InputError(f"{target}: exists and is not a memory bank folder; refusing to replace it.")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
        try:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            manifest = dict(self.manifest)
            manifest["index"] = dict(manifest["index"], file=INDEX_FILE, ntotal=self.ntotal)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = target
        return target


def load_bank(path: str | os.PathLike, *, mmap: bool = False) -> MemoryBank:
    """Open a bank folder; check its manifest and index agree. ``mmap`` maps large indexes."""
    path = Path(path)
    mf = path / MANIFEST_FILE
    if not path.is_dir() or not mf.is_file():
        raise InputError(f"{path}: not a memory bank folder (no {MANIFEST_FILE}). Build one with 'mias-sam build-bank'.")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{mf}: is not valid JSON ({exc}); the bank is damaged, rebuild it.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
        raise InputError(f"{mf}: not a napari-mias-sam bank manifest.")
    if int(manifest.get("format_version", 0)) > BANK_FORMAT_VERSION:
        raise InputError(f"{path}: bank format {manifest.get('format_version')} is newer than this version of napari-mias-sam; upgrade it.")
    idx_file = path / manifest.get("index", {}).get("file", INDEX_FILE)
    if not idx_file.is_file():
        raise InputError(f"{idx_file}: missing; the bank folder is incomplete, rebuild it.")
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(idx_file), flags)
    except Exception as exc:
        raise InputError(f"{idx_file}: cannot read the faiss index ({exc}); the bank is damaged, rebuild it.") from exc
    missing = [k for k in ("backbone", "preprocessing", "patch_layout", "feature_dim") if k not in manifest]
    try:
        want_d, want_n = int(manifest["feature_dim"]), int(manifest["index"]["ntotal"])
    except (KeyError, TypeError, ValueError):
        missing.append("index.ntotal")
    if missing:
        raise InputError(f"{mf}: lacks or garbles {', '.join(missing)}; the bank is damaged, rebuild it.")
    if index.d != want_d or index.ntotal != want_n:
        raise InputError(
            f"{path}: index ({index.ntotal} x {index.d}) does not match its manifest "
            f"({manifest['index']['ntotal']} x {manifest['feature_dim']}); rebuild the bank."
        )
    return MemoryBank(index, manifest, path)


def check_compatible(bank: MemoryBank, backbone_info: dict, *, preprocessing: dict | None = None) -> None:
    """Refuse a bank made with another backbone or weights (its embedding space is different)."""
    b = bank.backbone
    where = bank.path or "the memory bank"
    if b.get("name") != backbone_info.get("name") or b.get("weights_sha256") != backbone_info.get("weights_sha256"):
        raise BankMismatchError(
            f"{where} was built with backbone {b.get('name')} (weights sha256 {str(b.get('weights_sha256'))[:12]}), "
            f"but the selected backbone is {backbone_info.get('name')} (weights sha256 "
            f"{str(backbone_info.get('weights_sha256'))[:12]}). Embeddings of different backbones or weights are not "
            f"comparable: select {b.get('name')} with the same weights, or rebuild the bank with the selected backbone."
        )
    if preprocessing is not None and preprocessing.get("mode") != bank.preprocessing.get("mode"):
        raise BankMismatchError(
            f"{where} was built with '{bank.preprocessing.get('mode')}' preprocessing but this run uses "
            f"'{preprocessing.get('mode')}'; use the bank's preprocessing or rebuild the bank."
        )


# -- building -----------------------------------------------------------------------------
def _calibration_shares(groups_sizes: list[int], budget: int) -> list[int]:
    """How many held-out calibration slices each group gives (about ``budget`` in all)."""
    total = max(sum(groups_sizes), 1)
    return [min(n, max(1, round(budget * n / total))) if n else 0 for n in groups_sizes]


def build_bank(
    groups: Iterable[SliceGroup],
    backbone,
    *,
    layout: str = "paper1024",
    preprocessing: dict,
    slice_axis: str = "axial",
    index_type: str = "flat",
    batch_size: int = 4,
    calibration_slices: int = 48,
    sigma: float = 4.0,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> MemoryBank:
    """Encode every normal slice, add its patches to a faiss index (streaming, batch by batch),
    then calibrate: held-out normal slices are scored against the bank *without their own
    group* (faiss ID selector), giving the normal scale used by ``calibrated`` normalisation.

    ``embed`` replaces ``backbone.encode`` (e.g. a cached encoder). Raises :class:`Cancelled`.
    """
    if layout not in PATCH_LAYOUTS:
        raise InputError(f"unknown patch layout {layout!r}; choose one of {', '.join(PATCH_LAYOUTS)}")
    groups = list(groups)
    if not groups:
        raise InputError("no normal sources were given; the bank would be empty.")
    encode = embed or backbone.encode
    d = feature_dim(layout)
    index = _new_index(d, index_type)
    shares = _calibration_shares([g.n for g in groups], calibration_slices)
    calib_feats: list[tuple[int, int, np.ndarray]] = []  # (group, slice, features)
    ranges: list[tuple[int, int]] = []
    sizes: list[int] = []
    sources: list[dict] = []
    total = sum(g.n for g in groups)
    done = 0
    for gi, g in enumerate(groups):
        frames, skipped = g.load()
        n = len(frames)
        picks = set(np.linspace(0, n - 1, min(shares[gi], n)).round().astype(int).tolist()) if n else set()
        start = index.ntotal
        for b0 in range(0, n, batch_size):
            if cancelled is not None and cancelled():
                raise Cancelled("bank build cancelled")
            batch = frames[b0 : b0 + batch_size]
            feats = patch_features(encode(batch), layout).cpu().numpy()
            for j in range(len(batch)):
                if b0 + j in picks:
                    calib_feats.append((gi, b0 + j, feats[j].copy()))
            flat = feats.reshape(-1, d)
            if not index.is_trained:
                index.train(flat)
            index.add(flat)
            done += len(batch)
            if progress:
                progress("encode normal slices", done, total)
        done += skipped
        ranges.append((start, index.ntotal))
        sizes.append(n)
        sources.append({"name": g.name, "slices": n, "skipped_empty": skipped})
    if index.ntotal == 0:
        raise InputError("no normal slices with anatomy were found (all were empty or constant); the bank would be empty.")

    calibration = _calibrate(index, calib_feats, ranges, sizes, sigma=sigma, progress=progress)
    manifest = {
        "format": BANK_FORMAT,
        "format_version": BANK_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": _package_version(),
        "backbone": backbone.describe(),
        "preprocessing": preprocessing,
        "slice_axis": slice_axis,
        "patch_layout": layout,
        "feature_dim": d,
        "patch": {"grid": GRID, "size": 5, "stride": 2, "padding": 2},
        "index": {"type": index_type, "metric": "squared_l2", "ntotal": int(index.ntotal), "file": INDEX_FILE},
        "counts": {"slices": sum(sizes), "patches": int(index.ntotal), "skipped_empty_slices": sum(x["skipped_empty"] for x in sources)},
        "sources": sources,
        "calibration": calibration,
    }
    return MemoryBank(index, manifest)


def _calibrate(index, calib_feats, ranges, sizes, *, sigma: float, progress: ProgressFn | None) -> dict:
    """Leave-one-group-out normal statistics for k = 1..5 (see :class:`Calibration`)."""
    if not calib_feats:
        return {"method": "none", "n_slices": 0, "per_k": {}}
    single = len(ranges) == 1
    kmax = max(CALIBRATION_KS)
    per_slice: list[np.ndarray] = []  # (kmax, 32, 32) sorted distances per calibration slice
    for n, (gi, si, feats) in enumerate(calib_feats):
        lo, hi = ranges[gi]
        if single:
            # One source only: exclude the slice and its neighbours (+/- 10 % of the volume).
            n_g = sizes[gi]
            margin = max(1, n_g // 10)
            s0, s1 = max(0, si - margin), min(n_g, si + margin + 1)
            lo, hi = ranges[gi][0] + s0 * GRID * GRID, ranges[gi][0] + s1 * GRID * GRID
            if hi - lo >= index.ntotal:
                continue
        dist = torch_knn(feats, index, kmax, exclude=(lo, hi))
        per_slice.append(dist.T.reshape(kmax, GRID, GRID))
        if progress:
            progress("calibrate on held-out normal slices", n + 1, len(calib_feats))
    if not per_slice:
        return {"method": "none", "n_slices": 0, "per_k": {}}
    stack = np.stack(per_slice)  # (S, kmax, 32, 32)
    per_k = {}
    for k in CALIBRATION_KS:
        scores = stack[:, :k].mean(axis=1)
        maps = maps_from_scores(scores, sigma=sigma)
        slice_max = maps.reshape(len(maps), -1).max(axis=1)
        per_k[str(k)] = {
            "low": float(np.median(maps)),
            "high": float(np.percentile(slice_max, 99)),
            "slice_max_map": [float(v) for v in slice_max],
            "slice_scores": [float(v) for v in scores.reshape(len(scores), -1).max(axis=1)],
            "patch_score_quantiles": {
                q: float(np.percentile(scores, float(q))) for q in ("50", "90", "99", "99.9", "100")
            },
        }
    return {
        "method": "leave-one-source-out" if not single else "leave-neighbouring-slices-out",
        "n_slices": len(per_slice),
        "sigma": sigma,
        "per_k": per_k,
    }


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("napari-mias-sam")
    except Exception:
        return "unknown"

