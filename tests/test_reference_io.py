"""The reference encoding's pieces, without running SAM's encoder: PIL frames and inputs identical
to what the paper's code builds, the mask round trip through 1024 identical to SAM's
``postprocess_masks``, and the refusals that keep a bank and a run from mixing encodings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import intensity_disc_fake
from napari_mias_sam.bank import SliceGroup, build_bank, check_compatible
from napari_mias_sam.core.errors import BankMismatchError, WeightsError
from napari_mias_sam.method.preprocess import to_frame
from napari_mias_sam.method.reference_encoding import (
    embedding_dtype,
    encoding_of,
    pil_resize,
    reference_frames,
    reference_mask_logits,
    reference_sam_input,
    to_uint8,
)

RNG = np.random.default_rng(0)
YY, XX = np.mgrid[:240, :240]
SLICE = np.clip(120 + 100 * np.sin(XX / 11.0) * np.cos(YY / 7.0) + RNG.normal(0, 8, (240, 240)), 0, 255).astype(np.uint8)


def test_frames_are_the_reference_codes_pil_resize():
    """A 240 x 240 BMAD slice: grey -> RGB -> PIL bilinear to 256 (torchvision's Resize on a PIL image),
    exactly; the float path differs on many pixels by one grey level."""
    want = np.asarray(Image.fromarray(SLICE).convert("RGB").resize((256, 256), Image.BILINEAR))
    got = reference_frames(SLICE[None] / 255.0, 256)[0].numpy()
    assert np.array_equal(to_uint8(got), want[..., 0]) and np.array_equal(want[..., 0], want[..., 2])
    assert np.array_equal(to_frame(SLICE[None] / 255.0, encoding="reference")[0].numpy(), got)
    standard = to_uint8(to_frame(SLICE[None] / 255.0)[0].numpy())
    assert (standard != want[..., 0]).mean() > 0.01  # why the reference frames need PIL


def test_uint8_round_trip_is_exact():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(to_uint8(torch.from_numpy(u8 / 255.0).float()), u8)


def test_non_square_slices_are_padded_bottom_right():
    tall = SLICE[:, :200]
    got = reference_frames(tall[None] / 255.0, 256)[0].numpy()
    sq = np.zeros((240, 240), np.uint8)
    sq[:, :200] = tall
    assert np.array_equal(to_uint8(got), pil_resize(sq[None], 256)[0])


def test_sam_input_is_set_image_s():
    """``reference_sam_input`` equals segment-anything's ResizeLongestSide + Sam.preprocess on the uint8 RGB slice."""
    from segment_anything.utils.transforms import ResizeLongestSide

    mean = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    frame = reference_frames(SLICE[None] / 255.0, 256)
    rgb = np.repeat(to_uint8(frame[0])[..., None], 3, axis=2)
    big = torch.as_tensor(ResizeLongestSide(1024).apply_image(rgb)).permute(2, 0, 1)[None]
    want = (big - mean) / std
    got = reference_sam_input(frame, 1024, mean, std)
    assert got.shape == (1, 3, 1024, 1024) and torch.equal(got, want)


def test_mask_logits_follow_postprocess_masks():
    """The round trip equals Sam.postprocess_masks for a 256 x 256 image at input size 1024 (and is not the identity)."""
    import torch.nn.functional as F

    low = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    up = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)[..., :1024, :1024]
    want = F.interpolate(up, (256, 256), mode="bilinear", align_corners=False)
    got = reference_mask_logits(low, 1024, 256)
    assert torch.equal(got, want)
    assert ((got > 0) != (low > 0)).any()


def test_encoding_helpers():
    assert encoding_of({}) == "standard" and encoding_of({"encoding": "reference"}) == "reference"
    fb = intensity_disc_fake()
    assert encoding_of(fb) == "standard" and embedding_dtype(fb) == torch.float16
    fb.encoding = "reference"
    assert embedding_dtype(fb) == torch.float32


def test_bank_and_run_of_different_encodings_are_refused():
    frames = to_frame(SLICE[None].repeat(2, 0) / 255.0)
    bank = build_bank([SliceGroup("g", 2, lambda: (frames, 0))], intensity_disc_fake(), preprocessing={"mode": "png"},
                      calibration_slices=1)
    info = intensity_disc_fake().describe()
    check_compatible(bank, info)
    check_compatible(bank, dict(info, encoding="standard"))  # banks from before the setting are standard
    with pytest.raises(BankMismatchError, match="'standard' encoding.*'reference'"):
        check_compatible(bank, dict(info, encoding="reference"))
    bank.manifest["backbone"] = dict(info, encoding="reference")
    with pytest.raises(BankMismatchError, match="run with the bank's encoding \\('reference'\\)"):
        check_compatible(bank, info)
    assert "reference encoding" in bank.summary()


def test_backbone_refusals():
    from napari_mias_sam.backbones import load_backbone

    with pytest.raises(WeightsError, match="LiteMedSAM has only the standard encoding"):
        load_backbone("litemedsam", encoding="reference")
    with pytest.raises(WeightsError, match="fp32"):
        load_backbone("sam-vit_b", random_init_seed=0, encoding="reference", precision="bf16")
    with pytest.raises(WeightsError, match="unknown encoding"):
        load_backbone("sam-vit_b", random_init_seed=0, encoding="exact")


def test_cli_build_bank_encoding(tmp_path, capsys):
    from napari_mias_sam.cli.commands import main

    folder = tmp_path / "bmad" / "train" / "good"
    folder.mkdir(parents=True)
    Image.fromarray(SLICE).save(folder / "a.png")
    rc = main(["build-bank", str(tmp_path / "bmad"), "--out", str(tmp_path / "bank"), "--encoding", "reference"])
    err = capsys.readouterr().err
    assert rc == 2 and "LiteMedSAM has only the standard encoding" in err.strip().splitlines()[-1]
    assert not (tmp_path / "bank").exists()
