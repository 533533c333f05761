"""The CPU fast paths: conv + batch-norm folding, the verified and cached ONNX export with its
fallbacks (missing packages, a damaged cache, a failed check), the LiteMedSAM wiring, and the
batched decode across slices. No timing assertions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mias_sam.backbones import fast_cpu as fe
from napari_mias_sam.backbones.openvino_cpu import OpenVinoCpuEncoder, openvino_available, verified_marker
from napari_mias_sam.method.prompts import Prompt

needs_onnx = pytest.mark.skipif(not fe.onnx_available(), reason="onnxruntime/onnx not installed")


def conv_bn(a: int, b: int, groups: int = 1) -> torch.nn.Sequential:
    s = torch.nn.Sequential()
    s.add_module("c", torch.nn.Conv2d(a, b, 3, padding=1, groups=groups, bias=False))
    s.add_module("bn", torch.nn.BatchNorm2d(b))
    return s


class TinyEncoder(torch.nn.Module):
    """A small stand-in image encoder with TinyViT's Conv2d_BN pattern and non-trivial BN stats."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.block = torch.nn.Sequential(conv_bn(8, 8, groups=8), torch.nn.GELU(), conv_bn(8, 16))
        self.out = torch.nn.Conv2d(16, 4, 1)
        g = torch.Generator().manual_seed(0)
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
        self.eval()

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.block(self.stem(x))))


needs_openvino = pytest.mark.skipif(not (fe.onnx_available() and openvino_available()), reason="openvino not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder; OpenVINO off (these tests pin the ONNX Runtime path; it has its own)."""
    monkeypatch.setenv("MIAS_SAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MIAS_SAM_OPENVINO", "0")
    return tmp_path / "cache"


def test_fold_conv_bn_is_exact_and_leaves_the_original_alone():
    enc = TinyEncoder()
    folded = fe.fold_conv_bn(enc)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())  # a copy was folded
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), enc(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fe.TorchCpuEncoder(enc)(x), enc(x), atol=1e-5, rtol=1e-5)


def test_modes_off_torch_and_bad():
    enc = TinyEncoder()
    fn, what = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc", input_size=32, mode="off")
    assert fn is None and "off" in what
    fn, what = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc", input_size=32, mode="torch")
    assert isinstance(fn, fe.TorchCpuEncoder) and what.startswith("folded PyTorch")
    with pytest.raises(ValueError, match="fast encoder mode"):
        fe.cpu_encoder(enc, name="tiny", weights_sha256="abc", input_size=32, mode="fastest")


def test_missing_onnxruntime_falls_back_to_torch(cache, monkeypatch):
    monkeypatch.setattr(fe, "onnx_available", lambda: False)
    fn, what = fe.cpu_encoder(TinyEncoder(), name="tiny", weights_sha256="abc", input_size=32, mode="auto")
    assert isinstance(fn, fe.TorchCpuEncoder) and "not installed" in what
    dec, what = fe.cpu_box_decoder(torch.nn.Module(), torch.zeros(1), name="tiny", weights_sha256="abc", input_size=32)
    assert dec is None and "not installed" in what


@needs_onnx
def test_onnx_export_is_verified_cached_and_reused(cache, monkeypatch):
    enc = TinyEncoder()
    fn, what = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc123", input_size=32)
    assert isinstance(fn, fe.OnnxCpuEncoder) and "ONNX Runtime" in what
    path = fe.onnx_cache_path("tiny", "abc123", 32)
    assert path.is_file() and fn.path == path
    assert not list(path.parent.glob(".*.part"))  # no temporaries left
    x = torch.rand(3, 3, 32, 32)  # a batch is run slice by slice
    with torch.inference_mode():
        ref = enc(x)
    assert float((fn(x) - ref).abs().max()) <= fe.TOLERANCE
    # a second backbone reuses the cached file: no export
    monkeypatch.setattr(fe, "_export_verified", lambda *a, **k: pytest.fail("exported again"))
    fn2, _ = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc123", input_size=32)
    assert isinstance(fn2, fe.OnnxCpuEncoder)
    # other weights: another file
    assert fe.onnx_cache_path("tiny", "def456", 32) != path


@needs_onnx
def test_the_checks_share_one_eager_forward_per_image(cache, monkeypatch):
    """The encoder's export, OpenVINO's check and the box decoder's export compare with the eager
    embedding of the same check image: it is computed once per encoder (1.4-1.5 s each on 2 cores
    for LiteMedSAM), and equals a fresh eager forward."""
    enc = TinyEncoder()
    calls = []
    # (the export traces a folded copy, hooks included: not an eager forward of this encoder)
    enc.register_forward_hook(lambda m, i, o: None if torch.jit.is_tracing() else calls.append(tuple(i[0].shape)))
    fn, _ = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc123", input_size=32)
    assert isinstance(fn, fe.OnnxCpuEncoder) and len(calls) == 1  # the export's reference
    ref = fe.eager_reference(enc, 32)  # what the box decoder's export reads: no second forward
    assert len(calls) == 1
    with torch.inference_mode():
        np.testing.assert_array_equal(ref.numpy(), enc(fe._check_input(32)).numpy())
    monkeypatch.delenv("MIAS_SAM_OPENVINO")
    if openvino_available():  # its check adds the mirrored image's forward only
        fn, _ = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc123", input_size=32)
        assert isinstance(fn, OpenVinoCpuEncoder) and len(calls) == 3  # (2 + the equality check above)
    assert fe.eager_reference(TinyEncoder(), 32) is not ref  # another encoder: its own


@needs_onnx
def test_onnx_batch_on_parallel_sessions_equals_one_session(cache):
    """A batch runs on one single-thread session per worker, slices side by side: the same
    embeddings, in the same order, as one session with every thread, slice after slice."""
    enc = TinyEncoder()
    fn, _ = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc123", input_size=32)
    par = fe.OnnxCpuEncoder(fn.path, threads=2, workers=2)
    one = fe.OnnxCpuEncoder(fn.path, threads=2, workers=1)
    x = torch.rand(5, 3, 32, 32)  # odd: one worker gets a slice more
    got, ref = par(x), one(x)
    assert par._parallel is not None and len(par._parallel) == 2 and one._parallel is None
    assert got.shape == ref.shape == (5, 4, 32, 32)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(par(x[:1]).numpy(), one(x[:1]).numpy())  # a single slice: the main session


@needs_openvino
def test_openvino_is_used_when_installed_checked_once_and_matches_onnx_runtime(cache, monkeypatch):
    """fast="auto" with openvino installed: the exported graph on OpenVINO (fp32), embeddings within
    the tolerance of eager PyTorch and of ONNX Runtime, one slice and a batch on streams; the check
    against eager PyTorch runs once (a marker next to the ONNX file); "onnx" keeps ONNX Runtime."""
    monkeypatch.delenv("MIAS_SAM_OPENVINO")
    enc = TinyEncoder()
    fn, what = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc123", input_size=32)
    assert isinstance(fn, OpenVinoCpuEncoder) and what.startswith("OpenVINO")
    path = fe.onnx_cache_path("tiny", "abc123", 32)
    assert verified_marker(path).is_file() and not list(path.parent.glob(".*.part"))
    x = torch.rand(5, 3, 32, 32)
    with torch.inference_mode():
        ref = enc(x)
    got = fn(x)
    assert fn._queue is not None  # the batch ran on the streams
    assert got.shape == ref.shape and float((got - ref).abs().max()) <= fe.TOLERANCE
    # a single slice (the latency model) gets the very bits it gets inside a batch (the streams), as
    # with ONNX Runtime: banks built in other batches (shards, Dask workers) stay byte-identical
    np.testing.assert_array_equal(fn(x[:1]).numpy(), got[:1].numpy())
    np.testing.assert_array_equal(fn(x[2:4]).numpy(), got[2:4].numpy())
    ort = fe.OnnxCpuEncoder(path, threads=2)
    assert float((got - ort(x)).abs().max()) <= fe.TOLERANCE
    calls = []
    monkeypatch.setattr(fe, "_check_input", lambda n: calls.append(n) or pytest.fail("checked again"))
    fn2, _ = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc123", input_size=32)
    assert isinstance(fn2, OpenVinoCpuEncoder) and not calls
    fn3, what3 = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc123", input_size=32, mode="onnx")
    assert isinstance(fn3, fe.OnnxCpuEncoder) and what3.startswith("ONNX Runtime")
    monkeypatch.setenv("MIAS_SAM_OPENVINO", "0")
    assert isinstance(fe.cpu_encoder(enc, name="tiny", weights_sha256="abc123", input_size=32)[0], fe.OnnxCpuEncoder)


@needs_openvino
def test_openvino_over_the_tolerance_falls_back_to_onnx_runtime(cache, monkeypatch):
    monkeypatch.delenv("MIAS_SAM_OPENVINO")
    enc = TinyEncoder()
    fe.cpu_encoder(enc, name="tiny", weights_sha256="abc", input_size=32, mode="onnx")  # export, verified
    monkeypatch.setattr(fe, "TOLERANCE", -1.0)  # now no difference can pass OpenVINO's check
    fn, what = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc", input_size=32)
    assert isinstance(fn, fe.OnnxCpuEncoder) and what.startswith("ONNX Runtime")
    assert not verified_marker(fe.onnx_cache_path("tiny", "abc", 32)).exists()


@needs_onnx
def test_damaged_cache_is_dropped_and_rebuilt(cache):
    enc = TinyEncoder()
    path = fe.onnx_cache_path("tiny", "abc", 32)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx model")
    fn, what = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc", input_size=32)
    assert isinstance(fn, fe.TorchCpuEncoder) and "ONNX path failed" in what  # this time: torch
    assert not path.exists()  # the damaged entry is gone...
    fn, _ = fe.cpu_encoder(enc, name="tiny", weights_sha256="abc", input_size=32)
    assert isinstance(fn, fe.OnnxCpuEncoder) and path.is_file()  # ...and the next backbone re-exports


@needs_onnx
def test_export_that_fails_the_check_is_discarded(cache, monkeypatch):
    monkeypatch.setattr(fe, "TOLERANCE", -1.0)  # no difference can pass
    fn, what = fe.cpu_encoder(TinyEncoder(), name="tiny", weights_sha256="abc", input_size=32, mode="onnx")
    assert isinstance(fn, fe.TorchCpuEncoder) and "differs from PyTorch" in what
    assert not (cache / "onnx").exists() or not any((cache / "onnx").iterdir())  # nothing cached, no temporaries


def test_litemedsam_fast_argument_is_checked_before_loading(monkeypatch):
    from napari_mias_sam.backbones.litemedsam import LiteMedSAM

    with pytest.raises(ValueError, match="fast encoder mode"):
        LiteMedSAM(device="cpu", fast="turbo")
    monkeypatch.setenv("MIAS_SAM_FAST_ENCODER", "warp")
    with pytest.raises(ValueError, match="fast encoder mode"):
        LiteMedSAM(device="cpu")


@pytest.mark.slow
def test_litemedsam_fast_paths_match_eager(mias_cache_dir):
    """The real encoder and box decoder: ONNX Runtime and folded torch against eager fp32."""
    from napari_mias_sam.backbones.litemedsam import LiteMedSAM

    eager = LiteMedSAM(device="cpu", fast="off")
    fast = LiteMedSAM(device="cpu", fast="auto")
    folded = LiteMedSAM(device="cpu", fast="torch")
    frames = fe._check_input(256)[:, 0].repeat(2, 1, 1)
    frames[1] = frames[1].flip(-1)
    ref = eager.encode(frames)
    assert float((folded.encode(frames) - ref).abs().max()) <= fe.TOLERANCE
    assert folded.encoder_runtime.startswith("folded PyTorch")
    got = fast.encode(frames)
    assert float((got - ref).abs().max()) <= fe.TOLERANCE
    if fe.onnx_available():
        assert fast.encoder_runtime.startswith("OpenVINO" if openvino_available() else "ONNX Runtime")
    for p in (Prompt("box", box=(70.0, 60.0, 150.0, 170.0)), Prompt("point", point=(100.0, 90.0)),
              Prompt("boxes", boxes=((20.0, 20.0, 60.0, 70.0), (120.0, 110.0, 180.0, 200.0)))):
        a, b = eager.decode(ref[0], p), fast.decode(ref[0], p)
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-3)
        np.testing.assert_allclose(b.iou, a.iou, atol=1e-4)
    if fe.onnx_available():
        assert fast.decoder_runtime.startswith("ONNX Runtime")
    # batched decode across slices equals slice-by-slice decode
    prompts = [Prompt("box", box=(70.0, 60.0, 150.0, 170.0)), Prompt("box", box=(30.0, 40.0, 120.0, 90.0))]
    one = [eager.decode(e, p) for e, p in zip(ref, prompts)]
    both = eager.decode_batch(ref, prompts)
    for x, y in zip(one, both):
        np.testing.assert_allclose(y.logits, x.logits, atol=1e-4)
        np.testing.assert_allclose(y.iou, x.iou, atol=1e-5)


def test_decode_all_batches_where_the_backbone_can(monkeypatch):
    """decode_all groups single-box prompts into decode_batch calls (GPU default, or asked for),
    decodes the rest one by one, and gives the same result as slice-by-slice decoding."""
    from fakes import FakeBackbone
    from napari_mias_sam.pipeline.segment import EncodedVolume, decode_all
    from napari_mias_sam.method.preprocess import Frame
    from napari_mias_sam.pipeline.settings import SegmentSettings

    class Batching(FakeBackbone):
        batch_calls: list[int] = []

        @staticmethod
        def batchable(p):
            return p is not None and p.kind in ("point", "box")

        def decode_batch(self, embeddings, prompts):
            self.batch_calls.append(len(prompts))
            return [self.decode(e, p) for e, p in zip(embeddings, prompts)]

    n = 7
    maps = np.zeros((n, 256, 256), np.float32)
    for s in range(n):
        maps[s, 40 + 10 * s : 60 + 10 * s, 100:130] = 1.0
    fg = np.ones(n, bool)
    fg[3] = False
    enc = EncodedVolume(embeddings=torch.zeros(n, 256, 64, 64, dtype=torch.float16), frames=torch.zeros(n, 256, 256),
                        foreground=fg, axis=2, frame=Frame(256, 256), key="k")
    st = SegmentSettings(prompt="cog-box")
    bb = Batching()
    ref = decode_all(enc, maps, bb, st)  # CPU default: slice by slice
    assert bb.batch_calls == []
    got = decode_all(enc, maps, bb, st, batch_size=4)
    assert bb.batch_calls == [4, 2]
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[2], ref[2])
    assert got[0] == ref[0] and got[0][3] is None


@needs_onnx
def test_a_slices_boxes_decoded_side_by_side_equal_one_by_one(lite_backbone, mias_cache_dir):
    """decode_many (a slice's region pieces: one single-thread ONNX session per core, side by
    side) gives each box exactly what decode gives it, bit for bit; other prompts go one by one;
    the decode cache keeps and returns the same arrays."""
    from napari_mias_sam.pipeline.decode_cache import CachedDecoder

    emb = lite_backbone.encode(fe._check_input(256)[:, 0])[0]
    boxes = [Prompt("box", box=(70.0, 60.0, 150.0, 170.0)), Prompt("box", box=(20.0, 20.0, 60.0, 70.0)),
             Prompt("box", box=(120.0, 110.0, 180.0, 200.0))]
    one = [lite_backbone.decode(emb, p) for p in boxes]
    many = lite_backbone.decode_many(emb, boxes)
    if lite_backbone.decoder_runtime.startswith("ONNX") and torch.get_num_threads() > 1:
        assert lite_backbone._fast_box._parallel is not None  # the side-by-side sessions ran
    for a, b in zip(one, many):
        np.testing.assert_array_equal(b.logits, a.logits)
        np.testing.assert_array_equal(b.iou, a.iou)
    mixed = [boxes[0], Prompt("point", point=(100.0, 90.0))]
    for a, b in zip([lite_backbone.decode(emb, p) for p in mixed], lite_backbone.decode_many(emb, mixed)):
        np.testing.assert_array_equal(b.logits, a.logits)
    cached = CachedDecoder(lite_backbone)
    first = cached.decode(emb, boxes[1])  # one remembered, two decoded together
    got = cached.decode_many(emb, boxes)
    assert got[1] is first and cached.hits == 1 and cached.misses == 3
    for a, b in zip(one, got):
        np.testing.assert_array_equal(b.logits, a.logits)
    # the viewer's prefetch: one box on one single-thread session, again decode's bit for bit
    for p, a in zip(mixed, [lite_backbone.decode(emb, p) for p in mixed]):
        b = lite_backbone.decode_one_thread(emb, p)
        np.testing.assert_array_equal(b.logits, a.logits)
        np.testing.assert_array_equal(b.iou, a.iou)
