"""``mias-sam benchmark``: per-stage times and peak memory of a whole-volume run.

A synthetic 240 x 240 x 155 MRI-like volume (the BraTS grid) is written to a temporary NIfTI
file and taken through every stage of :func:`napari_mias_sam.pipeline.segment.segment_volume`: load,
preprocess, encode, nearest-neighbour search, map, prompt, decode, write. The kNN stage is timed
against banks of random vectors of the requested sizes (search time does not depend on the
values for exhaustive search), with the volume's real patch features as queries.

Where a stage is timed on part of the volume (a few slices encoded on a CPU, a few query
slices against a large bank), the report gives the measured time, what it was measured on,
and the whole-volume figure scaled linearly, labelled ``"extrapolated"``. Banks that do not fit
the memory budget on a CPU are not built: their kNN time is scaled from the largest measured
bank (also labelled). Nothing is invented: every figure is a measurement or a labelled linear
scaling of one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core import defaults
from ..core.machine import machine_info, peak_rss_mb, ram_bytes
from ..core.progress import ProgressFn

__all__ = ["BENCH_SHAPE", "DEFAULT_SIZES", "synthetic_volume", "run_benchmark", "format_report"]

BENCH_SHAPE = (240, 240, 155)
DEFAULT_SIZES = (10_000, 100_000, 1_000_000, 7_680_000)
#: CPU kNN: query slices per bank size are chosen so one measurement costs about this many flops.
CPU_KNN_FLOP_BUDGET = 4e11



class _Clock:
    """Times stages (synchronising CUDA) and records the process's peak RSS (and CUDA peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stages: dict[str, dict] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, name: str, fn: Callable, **extra):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        rec = {"seconds": round(time.perf_counter() - t0, 4), "peak_rss_mb": peak_rss_mb(), **extra}
        if self.device.type == "cuda":
            rec["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        self.stages[name] = rec
        return out


# -- the synthetic volume -------------------------------------------------------------------
def synthetic_volume(shape: tuple[int, int, int] = BENCH_SHAPE, seed: int = 0) -> np.ndarray:
    """A brain-like float32 volume: an ellipsoid 'head' with smooth inner structure, noise, a
    bright spherical 'lesion', and empty slices at both ends (as skull-stripped BraTS has)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    body = (x / 0.75) ** 2 + (y / 0.85) ** 2 + (z / 0.8) ** 2 <= 1
    vol = np.where(body, 400 + 150 * np.cos(3 * x) * np.sin(2 * y) + 80 * z, 0).astype(np.float32)
    vol += body * rng.normal(0, 20, size=shape).astype(np.float32)
    lesion = (x - 0.3) ** 2 + (y + 0.2) ** 2 + (z - 0.1) ** 2 <= 0.12**2
    vol[lesion] += 300
    return np.clip(vol, 0, None)


# -- the benchmark --------------------------------------------------------------------------
def _random_blocks(n: int, d: int, *, device: torch.device, seed: int, block: int = 1 << 18):
    g = torch.Generator(device=device).manual_seed(seed)
    for s in range(0, n, block):
        yield torch.randn(min(block, n - s), d, generator=g, device=device)


def _cpu_index(n: int, d: int, index_type: str, seed: int):
    """A faiss index of ``n`` random vectors, built in blocks (host memory: the index + a block)."""
    import faiss

    from ..bank.indexes import INDEX_TABLE, new_index, trained_index

    if not INDEX_TABLE[index_type].trained:
        index = new_index(d, index_type)
    else:
        train = next(_random_blocks(min(n, 65_536), d, device=torch.device("cpu"), seed=seed + 1, block=65_536)).numpy()
        index, _ = trained_index(d, index_type, train, n)
    for blk in _random_blocks(n, d, device=torch.device("cpu"), seed=seed):
        index.add(np.ascontiguousarray(blk.numpy()))
    assert isinstance(index, faiss.Index)
    return index


def _bytes_per_vector(index_type: str, d: int) -> int:
    from ..bank.indexes import INDEX_TABLE

    return d * INDEX_TABLE[index_type].bytes_per_dim


def run_benchmark(
    *,
    device: str | torch.device = "cpu",
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    encode_slices: int | None = None,
    decode_slices: int | None = None,
    layout: str = defaults.PATCH_LAYOUT,
    precision: str = "fp32",
    knn_index: str = defaults.INDEX_TYPE,
    knn_queries: int | None = None,
    knn_backend: str = "auto",
    memory_fraction: float = 0.5,
    quick: bool = False,
    backbone=None,
    progress: ProgressFn | None = None,
) -> dict:
    """Time every stage for a synthetic 240 x 240 x 155 volume; see the module docstring.

    ``encode_slices``/``decode_slices``: slices timed (default: 8 on a CPU, every slice with
    anatomy on a GPU). ``knn_index``: the CPU index type for the kNN stage (GPU: the torch
    search, plus faiss-gpu where installed). ``knn_backend``: ``auto`` (faiss on a CPU, the torch
    search on a GPU), ``faiss`` or ``torch`` (the GPU code path, also runnable on a CPU: how the
    tests check it). ``knn_queries``: on a CPU, time this many query
    patches (fewer than a slice's 1,024: for slow index types at large sizes) instead of whole
    slices. Banks whose CPU index would take more than ``memory_fraction`` of the available
    memory are scaled from the largest measured one.
    ``quick``: a small volume and bank for tests (not a measurement of the target).
    """
    from ..method.anomaly import Calibration, maps_from_scores, normalise_maps
    from ..backbones import load_backbone, pick_device
    from ..bank import estimate_bank_memory
    from ..data.volumes import load_volume, save_nifti
    from ..bank.knn import TorchSearcher
    from ..method.patches import feature_dim, patch_features
    from ..pipeline.segment import decode_one
    from ..method.preprocess import Frame, from_frame, PREPROCESS_PRESETS
    from ..method.prompts import make_prompt, default_prompt_for
    from ..pipeline.frames import volume_frames
    from ..core.defaults import GAMMA_SWEEP

    dev = pick_device(device)
    on_gpu = dev.type == "cuda"
    shape = (64, 64, 12) if quick else BENCH_SHAPE
    if quick:
        sizes = tuple(min(s, 20_000) for s in sizes[:2]) or (5_000,)
    d = feature_dim(layout)
    clock = _Clock(dev)
    say = progress or (lambda *a: None)
    report: dict = {"machine": machine_info(dev), "device": str(dev), "volume_shape": list(shape), "layout": layout,
                    "feature_dim": d, "precision": precision, "quick": quick}

    with tempfile.TemporaryDirectory(prefix="mias-sam-bench-") as tmp:
        path = Path(tmp) / "bench.nii.gz"
        import nibabel as nib

        nib.save(nib.Nifti1Image(synthetic_volume(shape), np.diag([1.0, 1.0, 1.0, 1.0])), str(path))

        say("load", 0, 1)
        vol = clock.run("load", lambda: load_volume(path))
        prep = PREPROCESS_PRESETS["mri"]

        def preprocess():
            frames, fg = volume_frames(vol.data, prep, 2)
            return frames.to(dev), fg

        say("preprocess", 0, 1)
        frames, fg = clock.run("preprocess", preprocess)
        n_slices, n_fg = len(frames), int(fg.sum())
        fg_idx = np.flatnonzero(fg)
        report["slices"] = {"total": n_slices, "with_anatomy": n_fg}

        # -- encode
        say("load backbone", 0, 1)
        bb = backbone or clock.run("load_backbone", lambda: load_backbone("litemedsam", device=dev, precision=precision))
        n_enc = min(n_fg, encode_slices or (n_fg if on_gpu else (2 if quick else 8)))
        batch = 16 if on_gpu else 4
        sel = torch.as_tensor(fg_idx[:n_enc])
        say("encode (warm-up)", 0, 1)
        clock.run("encode_warmup", lambda: bb.encode(frames[sel[:1]]),
                  note="first call: builds or loads the fast CPU encoder (ONNX export on first use), CUDA kernels")

        def encode():
            return torch.cat([bb.encode(frames[sel[b : b + batch]]) for b in range(0, n_enc, batch)])

        say("encode", 0, n_enc)
        emb = clock.run("encode", encode, slices=n_enc, batch_size=batch)
        enc = clock.stages["encode"]
        enc["per_slice_s"] = round(enc["seconds"] / max(n_enc, 1), 4)
        enc["volume_s"] = round(enc["per_slice_s"] * n_fg, 3)
        enc["volume_is"] = "measured" if n_enc == n_fg else f"extrapolated from {n_enc} slices"
        enc["runtime"] = getattr(bb, "encoder_runtime", "PyTorch")
        # every slice with anatomy gets an embedding (slices not encoded reuse encoded ones:
        # the later stages' cost does not depend on the values)
        emb_all = emb[torch.arange(n_fg) % n_enc].to(torch.float16)

        say("patch features", 0, 1)
        feats = clock.run("features", lambda: patch_features(emb_all.float(), layout))

        # -- kNN
        knn_rows = []
        _, avail = ram_bytes()
        budget = (avail or 8 * 2**30) * memory_fraction
        measured_cpu: list[dict] = []
        if knn_backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"knn_backend must be auto, faiss or torch, got {knn_backend!r}")
        use_torch = knn_backend == "torch" or (knn_backend == "auto" and on_gpu)
        for si, size in enumerate(sizes):
            say(f"kNN bank {size:,}", si, len(sizes))
            row: dict = {"bank_patches": int(size), "memory": estimate_bank_memory(size, layout, "flat" if use_torch else knn_index)}
            if use_torch:
                row.update(_torch_knn(size, d, feats, n_fg, dev, clock, TorchSearcher))
            elif size * _bytes_per_vector(knn_index, d) > budget:
                base = measured_cpu[-1] if measured_cpu else None
                row["index"] = knn_index
                if base is None:
                    row["status"] = "skipped: does not fit the memory budget and no smaller bank was measured"
                else:
                    scale = size / base["bank_patches"]
                    row["status"] = (f"extrapolated linearly from the {base['bank_patches']:,}-patch bank "
                                     f"(a {knn_index} index of {size:,} x {d} would need "
                                     f"{size * _bytes_per_vector(knn_index, d) / 1e9:.1f} GB; budget {budget / 1e9:.1f} GB)")
                    row["per_slice_s"] = round(base["per_slice_s"] * scale, 4)
                    row["volume_s"] = round(row["per_slice_s"] * n_fg, 3)
            else:
                row.update(_cpu_knn(size, d, feats, n_fg, knn_index, clock, quick, knn_queries))
                measured_cpu.append(row)
            knn_rows.append(row)
        report["knn"] = knn_rows

        # -- map, prompt, decode, live update, write
        rng = np.random.default_rng(0)
        scores = np.zeros((n_slices, 32, 32), np.float32)
        scores[fg_idx] = rng.gamma(2.0, 1.0, size=(n_fg, 32, 32)).astype(np.float32)
        scores[fg_idx, 10:14, 18:22] += 8.0  # an 'anomaly'
        cal = Calibration(low=float(np.median(scores[fg_idx])), high=float(np.percentile(scores[fg_idx], 99.9)))

        def make_maps():
            m = normalise_maps(maps_from_scores(scores), "calibrated", cal)
            m[~fg] = 0.0
            return m

        say("map", 0, 1)
        maps = clock.run("map", make_maps)
        kind = default_prompt_for(bb.name)
        say("prompt", 0, 1)
        prompts = clock.run("prompt", lambda: [make_prompt(maps[s], kind) for s in fg_idx], prompt_type=kind)
        n_dec = min(n_fg, decode_slices or (n_fg if on_gpu else (2 if quick else 8)))
        dec_emb = emb_all[:n_dec]
        dec_prompts = [p for p in prompts[:n_dec]]
        say("decode", 0, n_dec)
        clock.run("decode_warmup", lambda: decode_one(bb, dec_emb[0], dec_prompts[0]))
        clock.run("decode_per_slice", lambda: [decode_one(bb, e, p) for e, p in zip(dec_emb, dec_prompts)], slices=n_dec)
        ds = clock.stages["decode_per_slice"]
        ds["per_slice_s"] = round(ds["seconds"] / n_dec, 4)
        ds["volume_s"] = round(ds["per_slice_s"] * n_fg, 3)
        ds["volume_is"] = "measured" if n_dec == n_fg else f"extrapolated from {n_dec} slices"
        if hasattr(bb, "decode_batch"):
            dbatch = 16 if on_gpu else 8
            clock.run("decode_batched", lambda: [bb.decode_batch(dec_emb[b : b + dbatch], dec_prompts[b : b + dbatch])
                                                 for b in range(0, n_dec, dbatch)], slices=n_dec, batch_size=dbatch)
            db = clock.stages["decode_batched"]
            db["per_slice_s"] = round(db["seconds"] / n_dec, 4)
            db["volume_s"] = round(db["per_slice_s"] * n_fg, 3)
            db["volume_is"] = ds["volume_is"]

        # live update of one slice with a cached embedding: new gamma -> prompt -> decode -> mask
        frame = Frame(shape[0], shape[1])
        live = []
        s_live = len(fg_idx) // 2
        for gamma in GAMMA_SWEEP:
            t0 = time.perf_counter()
            p = make_prompt(maps[fg_idx[s_live]], kind, gamma=gamma)
            lg, _ = decode_one(bb, emb_all[s_live], p)
            from_frame(lg[2:3].astype(np.float32), frame)[0] > 0  # noqa: B015 (the viewer's mask)
            live.append(time.perf_counter() - t0)
        clock.stages["live_update"] = {"median_s": round(float(np.median(live)), 4), "max_s": round(float(np.max(live)), 4),
                                       "repeats": len(live), "what": "one slice: new gamma -> prompt -> decode -> mask on the slice grid"}

        def write():
            logits = np.zeros((n_slices, 256, 256), np.float32)
            mask = np.moveaxis(from_frame(logits, frame) > 0, 0, 2).astype(np.uint8)
            amap = np.moveaxis(from_frame(maps, frame), 0, 2).astype(np.float32)
            save_nifti(Path(tmp) / "mask.nii.gz", mask, vol, dtype="uint8", intent="label")
            save_nifti(Path(tmp) / "anomaly.nii.gz", amap, vol, dtype="float32")

        say("write", 0, 1)
        clock.run("write", write)

    report["stages"] = clock.stages
    report["peak_rss_mb"] = peak_rss_mb()
    if on_gpu:
        report["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)
    report["totals"] = _totals(report, on_gpu)
    return report


def _cpu_knn(size: int, d: int, feats: torch.Tensor, n_fg: int, index_type: str, clock: _Clock, quick: bool,
             knn_queries: int | None = None) -> dict:
    t0 = time.perf_counter()
    index = _cpu_index(size, d, index_type, seed=size % 1000)
    build = time.perf_counter() - t0
    q_slices = max(1, min(n_fg, int(CPU_KNN_FLOP_BUDGET // (1024 * size * d * 2))))
    if quick:
        q_slices = 1
    q = np.ascontiguousarray(feats[:q_slices].reshape(-1, d).numpy(), dtype=np.float32)
    if knn_queries is not None and knn_queries < len(q):
        q, q_slices = q[:knn_queries], knn_queries / 1024
    index.search(q[:16], 1)  # warm-up
    name = f"knn_{size}"
    clock.run(name, lambda: index.search(q, 1))
    rec = clock.stages.pop(name)
    per_slice = rec["seconds"] / q_slices
    status = "measured" if q_slices == n_fg else (
        f"extrapolated from {len(q)} query patches" if q_slices < 1 else f"extrapolated from {q_slices} query slices")
    del index
    return {"index": index_type, "build_s": round(build, 3), "search_s": rec["seconds"], "query_slices": round(q_slices, 4),
            "per_slice_s": round(per_slice, 4), "volume_s": round(per_slice * n_fg, 3), "status": status,
            "peak_rss_mb": rec["peak_rss_mb"]}


def _torch_knn(size: int, d: int, feats: torch.Tensor, n_fg: int, dev: torch.device, clock: _Clock, TorchSearcher) -> dict:
    """The torch search (the GPU path) over every slice's queries; faiss-gpu too where installed."""
    out: dict = {"index": "torch (fp16 product, fp32 re-rank)"}
    t0 = time.perf_counter()
    s = TorchSearcher(_random_blocks(size, d, device=dev, seed=size % 1000), device=dev)
    clock._sync()
    out["build_s"] = round(time.perf_counter() - t0, 3)
    out["exact_fp32_rerank"] = s.exact_fp32
    q = feats.reshape(-1, d).to(dev)
    s.search(q[:1024], 1)  # warm-up
    name = f"knn_{size}"
    clock.run(name, lambda: s.search(q, 1))
    rec = clock.stages.pop(name)
    out.update(search_s=rec["seconds"], query_slices=n_fg, per_slice_s=round(rec["seconds"] / n_fg, 5),
               volume_s=rec["seconds"], status="measured", cuda_peak_mb=rec.get("cuda_peak_mb"),
               device_bank_mb=round(s.nbytes() / 2**20, 1))
    del s
    if dev.type != "cuda":
        return out
    torch.cuda.empty_cache()
    import faiss

    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        try:
            res = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.useFloat16 = True
            gi = faiss.GpuIndexFlatL2(res, d, cfg)
            for blk in _random_blocks(size, d, device=torch.device("cpu"), seed=size % 1000):
                gi.add(np.ascontiguousarray(blk.numpy()))
            qn = np.ascontiguousarray(q.cpu().numpy())
            gi.search(qn[:1024], 1)
            t0 = time.perf_counter()
            gi.search(qn, 1)
            out["faiss_gpu_flat_fp16_s"] = round(time.perf_counter() - t0, 4)
            del gi
        except Exception as exc:  # report, do not fail the benchmark
            out["faiss_gpu_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _totals(rep: dict, on_gpu: bool) -> list[dict]:
    """Whole-volume time per bank size: the sum of the stages' whole-volume figures."""
    st = rep["stages"]
    fixed = st["load"]["seconds"] + st["preprocess"]["seconds"] + st["features"]["seconds"] + st["map"]["seconds"] + st["prompt"]["seconds"] + st["write"]["seconds"]
    enc = st["encode"]["volume_s"]
    dec = st.get("decode_batched", st["decode_per_slice"])["volume_s"] if on_gpu else st["decode_per_slice"]["volume_s"]
    rows = []
    for k in rep["knn"]:
        if "volume_s" not in k:
            continue
        extrap = k["status"] != "measured" or st["encode"]["volume_is"] != "measured" or st["decode_per_slice"]["volume_is"] != "measured"
        rows.append({"bank_patches": k["bank_patches"], "volume_s": round(fixed + enc + k["volume_s"] + dec, 2),
                     "decode": "batched" if on_gpu and "decode_batched" in st else "per slice",
                     "is": "includes extrapolated stages" if extrap else "measured"})
    return rows


def format_report(rep: dict) -> str:
    """The report as plain text (what ``mias-sam benchmark`` prints without ``--json``)."""
    m = rep["machine"]
    lines = [
        f"MIAS-SAM benchmark, {m['date_utc']}, device {rep['device']}" + (" (QUICK: not a measurement of the targets)" if rep["quick"] else ""),
        f"  machine: {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, RAM {m['ram_gib']} GiB"
        + (f", GPU {m.get('gpu')} ({m.get('gpu_memory_gib')} GiB)" if m.get("gpu") else "")
        + f"; load average {tuple(round(x, 1) for x in m['load_average']) if m.get('load_average') else 'n/a'}",
        f"  torch {m['torch']}, faiss {m['faiss']} (GPUs {m['faiss_gpus']}), onnxruntime {m['onnxruntime']}",
        f"  volume {' x '.join(map(str, rep['volume_shape']))} ({rep['slices']['with_anatomy']} slices with anatomy), "
        f"layout {rep['layout']} ({rep['feature_dim']}-d), precision {rep['precision']}",
        "  stage                      seconds   per slice   whole volume   peak RSS MB (process, so far)",
    ]
    st = rep["stages"]
    for name in ("load", "preprocess", "load_backbone", "encode_warmup", "encode", "features", "map", "prompt",
                 "decode_warmup", "decode_per_slice", "decode_batched", "write"):
        if name not in st:
            continue
        r = st[name]
        per = f"{r['per_slice_s']:.4f}" if "per_slice_s" in r else ""
        vol = f"{r['volume_s']:.2f}" + (" (extrap.)" if r.get("volume_is", "measured") != "measured" else "") if "volume_s" in r else ""
        lines.append(f"  {name:<24} {r['seconds']:>9.3f}   {per:>9}   {vol:>12}   {r['peak_rss_mb']:>10}")
    if "encode" in st:
        lines.append(f"  encoder runtime: {st['encode'].get('runtime')}; encode timed on {st['encode']['slices']} slices "
                     f"({st['encode']['volume_is']})")
    lv = st.get("live_update")
    if lv:
        lines.append(f"  live update ({lv['what']}): median {lv['median_s'] * 1000:.0f} ms, max {lv['max_s'] * 1000:.0f} ms over {lv['repeats']}")
    lines.append("  kNN (k=1)       index                     build s   search s  q.slices  per slice s  whole volume s  status")
    for k in rep["knn"]:
        if "per_slice_s" not in k:
            lines.append(f"  {k['bank_patches']:>12,}   {k.get('index', ''):<24}  {k['status']}")
            continue
        lines.append(f"  {k['bank_patches']:>12,}   {k.get('index', ''):<24}  {k.get('build_s', ''):>7}  {k.get('search_s', ''):>9}  "
                     f"{k.get('query_slices', ''):>8}  {k['per_slice_s']:>11}  {k['volume_s']:>14}  {k['status']}")
    lines.append("  whole volume end to end (sum of stages):")
    for t in rep["totals"]:
        lines.append(f"    bank {t['bank_patches']:>12,}: {t['volume_s']:>8.2f} s  (decode {t['decode']}; {t['is']})")
    lines.append(f"  peak RSS {rep['peak_rss_mb']} MB" + (f"; CUDA max reserved {rep['cuda_max_reserved_mb']} MB" if "cuda_max_reserved_mb" in rep else ""))
    return "\n".join(lines)
