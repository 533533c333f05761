"""The exported ONNX encoder run with OpenVINO's CPU plugin (optional extra ``openvino``).

Same graph as the ONNX Runtime path (:mod:`.fast_cpu`: folded, exported once, cached), compiled by
OpenVINO in fp32 (``INFERENCE_PRECISION_HINT=f32``: its bf16 default on CPUs with AVX512-BF16 moves
embeddings by ~6e-2, far over the 1e-4 tolerance). A batch runs on one stream per core (one
single-thread inference each, slices side by side, as ONNX Runtime's parallel sessions); a single
slice on a latency-mode model with every thread. Measured 0.79x of ONNX Runtime's parallel sessions'
time per slice on the 2-core test machine (docs/performance.md), embeddings within 4e-6 of eager
PyTorch.

Used automatically by ``fast="auto"`` when ``openvino`` imports, after a check against the eager
model on the export's test input (within :data:`~.fast_cpu.TOLERANCE`), recorded next to the cached
ONNX file per OpenVINO version so it runs once; any failure falls back to ONNX Runtime.
``MIAS_SAM_OPENVINO=0`` (or ``fast="onnx"``) keeps ONNX Runtime.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

__all__ = ["openvino_available", "OpenVinoCpuEncoder", "ENV", "verified_marker"]

#: ``0`` turns the OpenVINO path off (ONNX Runtime is used).
ENV = "MIAS_SAM_OPENVINO"


def openvino_available() -> bool:
    """True when ``openvino`` imports and ``MIAS_SAM_OPENVINO`` is not ``0``."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import openvino  # noqa: F401
    except Exception:
        return False
    return True


def verified_marker(onnx_path: Path) -> Path:
    """The file that records that this OpenVINO version ran ``onnx_path`` within tolerance."""
    import re

    import openvino as ov

    version = re.sub(r"[^A-Za-z0-9.]+", "_", str(ov.__version__))  # e.g. 2026.4.1-22982-e213a147257-releases/2026/4
    return onnx_path.with_name(f"{onnx_path.name}.openvino-{version}.ok")


class OpenVinoCpuEncoder:
    """OpenVINO compiled models of the exported encoder: ``(B, 3, H, W) -> (B, C, h, w)``, fp32."""

    kind = "openvino"

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import openvino as ov

        self.path = Path(path)
        self.threads = max(1, int(threads or torch.get_num_threads()))
        self._core = ov.Core()
        self._model = self._core.read_model(str(self.path))
        self._latency = self._core.compile_model(self._model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(self.threads)})
        self._request = self._latency.create_infer_request()
        self._queue = None  # streams for batches, compiled on the first batch
        self._lock = threading.Lock()

    def _streams(self):
        import openvino as ov

        with self._lock:
            if self._queue is None:
                cm = self._core.compile_model(self._model, "CPU", {
                    "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT",
                    "NUM_STREAMS": str(self.threads), "INFERENCE_NUM_THREADS": str(self.threads)})
                self._queue = ov.AsyncInferQueue(cm, self.threads)
        return self._queue

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if len(arr) < 2 or self.threads < 2:
            with self._lock:
                outs = [np.array(self._request.infer({0: arr[i : i + 1]})[0]) for i in range(len(arr))]
            return torch.from_numpy(np.concatenate(outs))
        queue = self._streams()
        outs: list = [None] * len(arr)

        def done(req, i: int) -> None:
            outs[i] = np.array(req.get_output_tensor(0).data)

        with self._lock:  # one batch at a time on the queue
            queue.set_callback(done)
            for i in range(len(arr)):
                queue.start_async({0: arr[i : i + 1]}, i)
            queue.wait_all()
        return torch.from_numpy(np.concatenate(outs))
