"""Faster CPU image encoders that give the same embeddings as the fp32 PyTorch model.

On a CPU, PyTorch's eager mode spends much of an encoder's time outside the matrix products:
unfused batch norms, layout copies, one kernel per element-wise op. Two paths close that gap:

``onnx``
    The encoder (its conv + batch-norm pairs folded first) is exported once to ONNX, verified
    against the PyTorch model, cached in the user cache folder keyed by the weights' SHA-256,
    and run with ONNX Runtime (dependencies ``onnxruntime`` and ``onnx``). It measured about 2x faster than eager PyTorch on the 2-core
    test machines (see docs/performance.md) with embeddings equal within 1e-5.
``openvino``
    Where the optional ``openvino`` package is installed (``pip install napari-mias-sam[openvino]``),
    ``fast="auto"`` runs the same exported graph with OpenVINO's CPU plugin in fp32
    (:mod:`.openvino_cpu`; 0.79x of ONNX Runtime's time per slice here, same tolerance), after a
    one-time check against the eager model; ONNX Runtime is its fallback.
``torch``
    The fallback when ONNX Runtime is missing or the export fails: the same folded model in
    PyTorch with channels-last memory layout.

Both are checked against the eager fp32 model: an exported model whose embeddings differ by
more than :data:`TOLERANCE` is discarded (and the torch path used). Nothing here is used on a GPU.

The prompt encoder + mask decoder for one box prompt get the same treatment
(:func:`cpu_box_decoder`): the viewer's live update (gamma, mask or prompt change on one slice)
is one such decode.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .base import DecodeStop, DecodeStopped
from .export_checks import check_input as _check_input, eager_reference, max_diff as _max_diff

__all__ = [
    "TOLERANCE",
    "FAST_MODES",
    "fold_conv_bn",
    "onnx_available",
    "TorchCpuEncoder",
    "OnnxCpuEncoder",
    "cpu_encoder",
    "cpu_box_decoder",
    "OnnxBoxDecoder",
    "onnx_cache_path",
    "eager_reference",
]

log = logging.getLogger(__name__)

#: Largest absolute embedding difference accepted between a fast path and the eager fp32 model
#: (embeddings are of order 1; measured differences are about 3e-6, and the embedding cache
#: stores float16, whose rounding step at 1.0 is 1e-3).
TOLERANCE = 1e-4
#: Bumped whenever the export recipe changes, so stale cached ONNX files are not reused.
EXPORT_VERSION = 1
ONNX_OPSET = 17
FAST_MODES = ("auto", "onnx", "torch", "off")

_lock = threading.Lock()


def fold_conv_bn(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` (eval mode) with every ``Sequential(c=Conv2d, bn=BatchNorm2d)`` pair
    (TinyViT's ``Conv2d_BN``) replaced by one convolution with the batch norm folded in."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    m = copy.deepcopy(module).eval()

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            kids = dict(child.named_children()) if isinstance(child, torch.nn.Sequential) else {}
            if set(kids) == {"c", "bn"} and isinstance(kids["c"], torch.nn.Conv2d) and isinstance(kids["bn"], torch.nn.BatchNorm2d):
                setattr(parent, name, fuse_conv_bn_eval(kids["c"], kids["bn"]))
            else:
                visit(child)

    visit(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def onnx_available() -> bool:
    """True when ONNX Runtime imports and the ``onnx`` package (needed by the exporter only) is
    installed. ``onnx`` is not imported here: its import costs about 0.9 s on 2 cores (measured),
    which a cached export never needs; a broken ``onnx`` makes the export fail, and the caller
    falls back as for any failed export."""
    import importlib.util

    try:
        import onnxruntime  # noqa: F401

        return importlib.util.find_spec("onnx") is not None
    except Exception:
        return False


class TorchCpuEncoder:
    """The folded encoder in PyTorch, channels-last (the fallback fast path)."""

    kind = "torch"

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.module = fold_conv_bn(encoder).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last)).contiguous()


def _session(path: str | os.PathLike, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxCpuEncoder:
    """ONNX Runtime sessions of the exported encoder (batch size 1: a batch of 4 in one call
    measured no faster per slice than single slices on 2 cores).

    A single slice runs on one session with every thread (the shortest wait for it). A batch runs
    on ``workers`` sessions of one thread each, one slice per session at a time, side by side (ONNX
    Runtime releases the GIL): each core then runs a whole encoder without waiting for the other at
    the ~800 operator boundaries of TinyViT, which an intra-op thread pool does (see
    docs/performance.md for the measured gain). The outputs are bit-identical whatever the
    threads (checked: one and two threads give equal embeddings).
    """

    kind = "onnx"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, workers: int | None = None) -> None:
        self.path = Path(path)
        self.threads = int(threads or torch.get_num_threads())
        self.session = _session(self.path, self.threads)
        self.input_name = self.session.get_inputs()[0].name
        self.workers = max(1, int(self.threads if workers is None else workers))
        self._parallel: list | None = None  # one-thread sessions for batches, made on the first batch
        self._pool = None

    def _batch_sessions(self):
        from concurrent.futures import ThreadPoolExecutor

        with _lock:
            if self._parallel is None:
                self._parallel = [_session(self.path, max(1, self.threads // self.workers)) for _ in range(self.workers)]
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mias-sam-encoder")
        return self._parallel, self._pool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if len(arr) < 2 or self.workers < 2:
            outs = [self.session.run(None, {self.input_name: arr[i : i + 1]})[0] for i in range(len(arr))]
            return torch.from_numpy(np.concatenate(outs))
        sessions, pool = self._batch_sessions()
        out = np.empty((len(arr),) + tuple(self.session.get_outputs()[0].shape[1:]), dtype=np.float32)

        def run(w: int) -> None:
            for i in range(w, len(arr), len(sessions)):
                out[i] = sessions[w].run(None, {self.input_name: arr[i : i + 1]})[0][0]

        for f in [pool.submit(run, w) for w in range(min(len(sessions), len(arr)))]:
            f.result()
        return torch.from_numpy(out)


class _BoxDecoderModule(torch.nn.Module):
    """Prompt encoder + mask decoder of a SAM-like model for one box, multimask output (the
    export wrapper; the dense positional encoding is a constant of the weights)."""

    def __init__(self, model: torch.nn.Module, dense_pe: torch.Tensor) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.register_buffer("dense_pe", dense_pe.detach().clone())

    def forward(self, embedding: torch.Tensor, box: torch.Tensor):
        sparse, dense = self.prompt_encoder(points=None, boxes=box, masks=None)
        return self.mask_decoder(image_embeddings=embedding, image_pe=self.dense_pe, sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense, multimask_output=True)


class OnnxBoxDecoder:
    """ONNX Runtime session of :class:`_BoxDecoderModule`: ``(embedding (1, C, h, w), box (1, 4)
    in encoder-input pixels) -> (low-res mask logits (1, 3, H, W), IoUs (1, 3))``."""

    kind = "onnx"

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        self.threads = int(threads or torch.get_num_threads())
        self.session = _session(self.path, self.threads)
        self._parallel: list | None = None  # one-thread sessions for several boxes, made on first use
        self._pool = None

    @staticmethod
    def _feed(embedding, box: torch.Tensor) -> dict:
        emb = embedding if isinstance(embedding, np.ndarray) else embedding.detach().cpu().numpy()
        return {"embedding": np.ascontiguousarray(emb, dtype=np.float32),
                "box": np.ascontiguousarray(box.detach().cpu().numpy(), dtype=np.float32).reshape(1, 4)}

    def __call__(self, embedding: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks, iou = self.session.run(None, self._feed(embedding, box))
        return torch.from_numpy(masks), torch.from_numpy(iou)

    def run_many(self, embedding: torch.Tensor, boxes: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Several single boxes on one embedding (a slice's region pieces): each box's output as
        :meth:`__call__` gives it, bit for bit (one and two threads give equal outputs: checked),
        computed side by side on one single-thread session per core. On 2 cores two boxes take
        about one box's time on the two-thread session plus a half (measured, docs/performance.md
        section 7), against two boxes' time one after the other."""
        workers = min(self.threads, len(boxes))
        if workers < 2:
            return [self(embedding, b) for b in boxes]
        self._one_thread_sessions()
        emb = np.ascontiguousarray(embedding.detach().cpu().numpy(), dtype=np.float32)  # converted once for every box
        out: list = [None] * len(boxes)

        def run(w: int) -> None:
            for i in range(w, len(boxes), workers):
                masks, iou = self._parallel[w].run(None, self._feed(emb, boxes[i]))
                out[i] = (torch.from_numpy(masks), torch.from_numpy(iou))

        for f in [self._pool.submit(run, w) for w in range(workers)]:
            f.result()
        return out

    def _one_thread_sessions(self) -> list:
        from concurrent.futures import ThreadPoolExecutor

        with _lock:
            if self._parallel is None or len(self._parallel) < max(self.threads, 1):
                self._parallel = [_session(self.path, 1) for _ in range(max(self.threads, 1))]
                self._pool = ThreadPoolExecutor(max(self.threads, 1), thread_name_prefix="mias-sam-decoder")
        return self._parallel

    def run_one_thread(self, embedding: torch.Tensor, box: torch.Tensor, stop: DecodeStop | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`__call__`'s output, bit for bit, computed on one core (a single-thread session, in
        the calling thread): a decode that leaves the other core to the GUI (the viewer's prefetch).
        ``stop``: its :meth:`~.base.DecodeStop.stop` ends the run at once (:class:`~.base.DecodeStopped`)."""
        import onnxruntime as ort

        session = self._one_thread_sessions()[0]
        feed = self._feed(embedding, box)
        options = ort.RunOptions()

        def terminate() -> None:
            options.terminate = True

        if stop is not None and not stop.attach(terminate):
            raise DecodeStopped("stopped before the decode")
        try:
            masks, iou = session.run(None, feed, options)
        except Exception:
            if stop is not None and stop.stopped:
                raise DecodeStopped("stopped during the decode") from None
            raise
        finally:
            if stop is not None:
                stop.detach(terminate)
        return torch.from_numpy(masks), torch.from_numpy(iou)


def onnx_cache_path(name: str, weights_sha256: str, input_size: int, part: str = "encoder") -> Path:
    """Where the exported ``part`` (``encoder`` or ``boxdecoder``) of these weights lives in the
    user cache folder."""
    from ..core.paths import cache_dir

    tag = f"{name}-{part}-{str(weights_sha256)[:16]}-in{input_size}-bs1-op{ONNX_OPSET}-v{EXPORT_VERSION}"
    return cache_dir() / "onnx" / f"{tag}.onnx"


def _export_verified(module: torch.nn.Module, args: tuple, names: tuple[list[str], list[str]], path: Path,
                     check: Callable[[Path], float]) -> None:
    """Export ``module`` to ``path`` (atomically) after ``check(tmp_path)`` (the largest difference
    from PyTorch) came out within :data:`TOLERANCE`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(tmp), input_names=names[0], output_names=names[1],
                              opset_version=ONNX_OPSET, dynamo=False)
        diff = check(tmp)
        if not diff <= TOLERANCE:
            raise RuntimeError(f"the exported model differs from PyTorch by {diff:.2e} (> {TOLERANCE:g})")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cached_session(path: Path, export: Callable[[], None], opener: Callable[[Path], object]):
    """Open the cached export at ``path``, exporting it first if missing; a damaged cache entry
    is deleted (and the error raised, for the caller's fallback)."""
    with _lock:
        if not path.is_file():
            export()
        try:
            return opener(path)
        except Exception:
            path.unlink(missing_ok=True)
            raise


def _reason(exc: Exception) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"ONNX path failed ({type(exc).__name__}: {msg})"


def cpu_encoder(
    encoder: torch.nn.Module,
    *,
    name: str,
    weights_sha256: str,
    input_size: int,
    mode: str = "auto",
    threads: int | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """The fastest available CPU encoder for ``encoder`` and a line saying which one it is.

    ``mode``: ``auto`` (OpenVINO on the exported graph when ``openvino`` is installed and checks
    out, else ONNX Runtime when installed, else the torch path), ``onnx`` (ONNX Runtime; the
    reason for a fallback is logged as a warning), ``torch``, or ``off`` (returns
    ``(None, ...)``: use the eager model). Never raises for a missing optional dependency or a
    failed export: it falls back and says why.
    """
    if mode not in FAST_MODES:
        raise ValueError(f"fast encoder mode must be one of {', '.join(FAST_MODES)}, got {mode!r}")
    if mode == "off":
        return None, "eager PyTorch (fast path off)"
    reason = ""
    if mode in ("auto", "onnx"):
        if not onnx_available():
            reason = "onnxruntime/onnx not installed (pip install onnxruntime onnx)"
        else:
            path = onnx_cache_path(name, weights_sha256, input_size)

            def export() -> None:
                x = _check_input(input_size)
                ref = eager_reference(encoder, input_size)
                log.info("exporting the %s encoder to ONNX once (cached at %s)", name, path)
                _export_verified(fold_conv_bn(encoder), (x,), (["image"], ["embedding"]), path,
                                 lambda p: _max_diff(OnnxCpuEncoder(p)(x), ref))

            try:
                enc = _cached_session(path, export, lambda p: OnnxCpuEncoder(p, threads))
            except Exception as exc:  # export or runtime failure: the torch path still works
                reason = _reason(exc)
            else:
                if mode == "auto":
                    ov_enc, why = _openvino_encoder(encoder, path, input_size, threads)
                    if ov_enc is not None:
                        return ov_enc, f"OpenVINO ({path.name})"
                    log.info("fast encoder: OpenVINO not used (%s); using ONNX Runtime", why)
                return enc, f"ONNX Runtime ({path.name})"
        (log.warning if mode == "onnx" else log.info)("fast encoder: %s; using folded PyTorch", reason)
    return TorchCpuEncoder(encoder), "folded PyTorch, channels-last" + (f" ({reason})" if reason else "")


def _openvino_encoder(encoder: torch.nn.Module, path: Path, input_size: int, threads: int | None):
    """``(OpenVinoCpuEncoder, "")`` for the exported ``path`` when ``openvino`` is installed and its
    embeddings (one slice and a batch) are within :data:`TOLERANCE` of the eager model's (checked
    once per OpenVINO version, recorded next to the ONNX file), else ``(None, why)``."""
    from .openvino_cpu import OpenVinoCpuEncoder, openvino_available, verified_marker

    if not openvino_available():
        return None, "openvino not installed or MIAS_SAM_OPENVINO=0"
    try:
        enc = OpenVinoCpuEncoder(path, threads)
        marker = verified_marker(path)
        if not marker.is_file():
            x = _check_input(input_size)
            x2 = torch.cat([x, x.flip(-1)])
            ref = torch.cat([eager_reference(encoder, input_size), eager_reference(encoder, input_size, mirrored=True)])
            diff = max(_max_diff(enc(x), ref[:1]), _max_diff(enc(x2), ref))
            if not diff <= TOLERANCE:
                raise RuntimeError(f"OpenVINO's embeddings differ from PyTorch by {diff:.2e} (> {TOLERANCE:g})")
            tmp = marker.with_name(f".{marker.name}.{os.getpid()}.part")
            tmp.write_text(f"max abs difference from eager PyTorch: {diff:.3e}\n")
            os.replace(tmp, marker)
        return enc, ""
    except Exception as exc:  # noqa: BLE001 (ONNX Runtime is the fallback)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def cpu_box_decoder(
    model: torch.nn.Module,
    dense_pe: torch.Tensor,
    *,
    name: str,
    weights_sha256: str,
    input_size: int,
    mode: str = "auto",
    threads: int | None = None,
) -> tuple[OnnxBoxDecoder | None, str]:
    """An ONNX Runtime decoder for single-box prompts, or ``(None, why)``: decode with PyTorch.

    Verified at export against the PyTorch decoder on a real embedding of a test image (mask
    logits and IoUs within :data:`TOLERANCE`). ``mode`` as for :func:`cpu_encoder` (``torch``
    and ``off`` mean PyTorch).
    """
    if mode not in FAST_MODES:
        raise ValueError(f"fast mode must be one of {', '.join(FAST_MODES)}, got {mode!r}")
    if mode in ("torch", "off"):
        return None, "PyTorch"
    if not onnx_available():
        return None, "PyTorch (onnxruntime/onnx not installed)"
    path = onnx_cache_path(name, weights_sha256, input_size, part="boxdecoder")
    module = _BoxDecoderModule(model, dense_pe).eval()

    def export() -> None:
        emb = eager_reference(model.image_encoder, input_size)  # shared with the encoder's export
        with torch.inference_mode():
            s = input_size / 256
            box = torch.tensor([[70.0, 60.0, 150.0, 170.0]]) * s
            ref = module(emb, box)

        def check(p: Path) -> float:
            got = OnnxBoxDecoder(p)(emb, box)
            return max(_max_diff(got[0], ref[0]), _max_diff(got[1], ref[1]))

        log.info("exporting the %s box decoder to ONNX once (cached at %s)", name, path)
        _export_verified(module, (emb, box), (["embedding", "box"], ["masks", "iou"]), path, check)

    try:
        return _cached_session(path, export, lambda p: OnnxBoxDecoder(p, threads)), f"ONNX Runtime ({path.name})"
    except Exception as exc:
        (log.warning if mode == "onnx" else log.info)("fast box decoder: %s; using PyTorch", _reason(exc))
        return None, f"PyTorch ({_reason(exc)})"
