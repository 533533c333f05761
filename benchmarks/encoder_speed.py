"""Seconds per slice of the CPU encoder (LiteMedSAM), and what faster variants cost in accuracy.

Run from the repository root::

    python benchmarks/encoder_speed.py                 # the variants' speed and embedding error (~3 min on 2 cores)
    python benchmarks/encoder_speed.py --dice          # + the Dice each inexact variant gives on the bundled sample

Variants, each run on the same real slices (``case_01`` of the bundled sample, as the pipeline
frames them), interleaved round by round so that a change of machine load hits them alike:

* ``ort-2threads``: ONNX Runtime, one session with every thread, one slice after the other (the
  encoder before issue 24);
* ``ort-parallel``: one single-thread session per core, slices side by side (what
  :class:`~napari_mias_sam.backbones.fast_cpu.OnnxCpuEncoder` does for a batch now);
* ``ort-extended``: as ``ort-2threads`` with graph optimisation level "extended" instead of "all";
* ``ort-int8``: dynamic int8 quantisation of the MatMul/Gemm weights (onnxruntime.quantization);
* ``ort-fp16``: the graph converted to float16 (onnxconverter-common, when installed);
* ``openvino-streams``: OpenVINO fp32, one single-thread stream per core, slices side by side (what
  :class:`~napari_mias_sam.backbones.openvino_cpu.OpenVinoCpuEncoder` does for a batch, the default
  when ``openvino`` is installed);
* ``openvino-f32`` / ``openvino-bf16``: OpenVINO's CPU plugin in latency mode (every thread on one
  slice), fp32 and bf16, when ``openvino`` is installed.

Prints, per variant, min and median seconds per slice (batches of ``--batch`` slices) and the
largest absolute difference of its embeddings from eager fp32 PyTorch (the fast path's tolerance is
1e-4). ``--dice``: for every variant over that tolerance, the bundled demo (bank from the sample
normals, ``case_01`` segmented with the default settings) run with its embeddings: slice and volume
Dice against the ground truth next to the exact encoder's. With the machine, the load average and
the date. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch


def _ort_session(path, threads: int, level: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _sequential(sess):
    name = sess.get_inputs()[0].name

    def run(arr: np.ndarray) -> np.ndarray:
        return np.concatenate([sess.run(None, {name: arr[i : i + 1]})[0] for i in range(len(arr))])

    return run


def variants(onnx_path: Path, threads: int, work: Path) -> dict:
    """name -> encode(array (B, 3, 256, 256)) -> (B, 256, 64, 64); skipped ones -> a reason."""
    from napari_mias_sam.backbones.fast_cpu import OnnxCpuEncoder

    out: dict = {"ort-2threads": _sequential(_ort_session(onnx_path, threads))}
    par = OnnxCpuEncoder(onnx_path, threads=threads)
    out["ort-parallel"] = lambda arr: par(torch.from_numpy(arr)).numpy()
    out["ort-extended"] = _sequential(_ort_session(onnx_path, threads, "extended"))
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q8 = work / "encoder-int8.onnx"
        quantize_dynamic(str(onnx_path), str(q8), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        out["ort-int8"] = _sequential(_ort_session(q8, threads))
    except Exception as exc:  # noqa: BLE001 (a variant that cannot be made is reported, not fatal)
        out["ort-int8"] = f"not made ({type(exc).__name__}: {exc})"
    try:
        import onnx
        from onnxconverter_common import float16

        m16 = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
        f16 = work / "encoder-fp16.onnx"
        onnx.save(m16, str(f16))
        out["ort-fp16"] = _sequential(_ort_session(f16, threads))
    except Exception as exc:  # noqa: BLE001
        out["ort-fp16"] = f"not made ({type(exc).__name__}: {exc})"
    try:
        import openvino as ov

        from napari_mias_sam.backbones.openvino_cpu import OpenVinoCpuEncoder

        ovp = OpenVinoCpuEncoder(onnx_path, threads=threads)
        out["openvino-streams"] = lambda arr: ovp(torch.from_numpy(arr)).numpy()
        core = ov.Core()
        for prec in ("f32", "bf16"):
            cm = core.compile_model(core.read_model(str(onnx_path)), "CPU", {
                "INFERENCE_PRECISION_HINT": prec, "INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY"})
            req = cm.create_infer_request()
            out[f"openvino-{prec}"] = (lambda r: lambda arr: np.concatenate([r.infer({0: arr[i : i + 1]})[0] for i in range(len(arr))]))(req)
    except ImportError:
        out["openvino-streams"] = out["openvino-f32"] = out["openvino-bf16"] = "openvino not installed"
    except Exception as exc:  # noqa: BLE001
        out["openvino-streams"] = out["openvino-f32"] = out["openvino-bf16"] = f"not made ({type(exc).__name__}: {exc})"
    return out


class VariantBackbone:
    """The bundled LiteMedSAM with its encoder replaced by a variant (for the Dice check)."""

    def __init__(self, backbone, encode_fn, name: str) -> None:
        self._bb, self._encode, self.variant = backbone, encode_fn, name

    def __getattr__(self, item):
        return getattr(self._bb, item)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        x = self._bb._encoder_input(frames.float()).numpy()
        return torch.from_numpy(np.ascontiguousarray(self._encode(np.ascontiguousarray(x)), dtype=np.float32))


def dice_of(backbone) -> dict:
    from napari_mias_sam.data.volumes import load_labels, load_volume
    from napari_mias_sam.evaluation.metrics import slice_dice, volume_dice
    from napari_mias_sam.jobs.bank_builds import build_bank_from_files
    from napari_mias_sam.jobs.demo import sample_files
    from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
    from napari_mias_sam.pipeline.segment import segment_volume

    files = sample_files()
    bank = build_bank_from_files(files["normals"], backbone, preprocessing=PREPROCESS_PRESETS["mri"])
    vol = load_volume(files["case"])
    gt = load_labels(files["gt"], like=vol).data > 0
    res = segment_volume(vol, bank, backbone)
    pred = res.mask_volume() > 0
    return {"slice_dice": slice_dice(pred, gt, axis=res.axis)["mean"], "volume_dice": volume_dice(pred, gt), "mask": pred}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds (each variant encodes --batch slices per round)")
    ap.add_argument("--batch", type=int, default=4, help="slices per call (default 4, as build-bank and segment)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dice", action="store_true", help="also the Dice of each variant over the 1e-4 tolerance")
    a = ap.parse_args(argv)

    from napari_mias_sam.backbones import load_backbone
    from napari_mias_sam.backbones.fast_cpu import TOLERANCE, onnx_cache_path
    from napari_mias_sam.jobs.demo import sample_files
    from napari_mias_sam.data.volumes import load_volume
    from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
    from napari_mias_sam.pipeline.frames import volume_frames

    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()
    bb = load_backbone("litemedsam", device="cpu")
    vol = load_volume(sample_files()["case"])
    frames, fg = volume_frames(vol.data, PREPROCESS_PRESETS["mri"], 2, source="case_01")
    frames = frames[np.flatnonzero(fg)]
    x = bb._encoder_input(frames[: a.batch].float()).numpy()
    bb.encode(frames[:1])  # exports (once) and checks the ONNX encoder
    onnx_path = onnx_cache_path(bb.name, bb.weights_sha256, bb.input_size)
    with torch.inference_mode():
        ref = bb.model.image_encoder.eval()(torch.from_numpy(x)).numpy()  # eager fp32 PyTorch
    work = Path(tempfile.mkdtemp(prefix="mias-sam-encoders-"))
    runs = variants(onnx_path, a.threads, work)
    ok = {k: f for k, f in runs.items() if callable(f)}
    diff = {k: float(np.abs(f(x) - ref).max()) for k, f in ok.items()}  # also the warm-up
    times: dict[str, list[float]] = {k: [] for k in ok}
    for _ in range(a.rounds):
        for k, f in ok.items():
            t0 = time.perf_counter()
            f(x)
            times[k].append((time.perf_counter() - t0) / len(x))
    print(f"\nCPU encoder, LiteMedSAM, {a.batch} real slices per call, {a.rounds} rounds, {a.threads} threads; measured {started} "
          f"on {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs); "
          f"load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    base = statistics.median(times["ort-2threads"])
    for k, f in runs.items():
        if not callable(f):
            print(f"  {k:14s}  {f}")
            continue
        t = times[k]
        verdict = "within" if diff[k] <= TOLERANCE else "OVER"
        print(f"  {k:14s}  s/slice min {min(t):.3f}  median {statistics.median(t):.3f}  ({statistics.median(t) / base:.2f}x of ort-2threads)"
              f"   max |embedding - eager fp32| {diff[k]:.1e} ({verdict} the {TOLERANCE:g} tolerance)")
    if a.dice:
        print("\nDice on the bundled sample (bank from its normals, case_01, default settings):")
        exact = dice_of(bb)
        print(f"  {'exact (default)':16s} slice Dice {exact['slice_dice']:.4f}  volume Dice {exact['volume_dice']:.4f}")
        for k, f in ok.items():
            if diff[k] <= TOLERANCE:
                continue
            d = dice_of(VariantBackbone(bb, f, k))
            agree = 2 * np.sum(d["mask"] & exact["mask"]) / max(1, d["mask"].sum() + exact["mask"].sum())
            print(f"  {k:16s} slice Dice {d['slice_dice']:.4f} ({100 * (d['slice_dice'] - exact['slice_dice']):+.2f} points)  "
                  f"volume Dice {d['volume_dice']:.4f} ({100 * (d['volume_dice'] - exact['volume_dice']):+.2f})  "
                  f"mask Dice vs the exact masks {agree:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
