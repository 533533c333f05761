"""Patch features (5 x 5, stride 2, zero padding 2, 32 x 32 grid) against independent
computations: the reference's unfold + adaptive 1-D pooling, hand-computed values, a manual
5 x 5 mean, and the grid's row-major order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_mias_sam.method.patches import GRID, feature_dim, paper_kernels, patch_features


def reference_paper1024(emb: torch.Tensor) -> torch.Tensor:
    """The reference computation: zero-pad 2, unfold 5x5 stride 2, each patch flattened
    channel-major (C * 25 values), 1-D adaptive average pooling to 4 C values."""
    n, c = emb.shape[:2]
    padded = F.pad(emb, (2, 2, 2, 2))
    cols = F.unfold(padded, kernel_size=5, stride=2)  # (N, C*25, L), channel-major rows
    assert cols.shape[-1] == 32 * 32
    per_patch = cols.transpose(1, 2).reshape(n * 1024, 1, c * 25)
    pooled = F.adaptive_avg_pool1d(per_patch, 4 * c)
    return pooled.reshape(n, 1024, 4 * c)


def ramp_embedding() -> torch.Tensor:
    """One channel with value 100 * row + col at (row, col)."""
    rr, cc = np.indices((64, 64))
    return torch.from_numpy((100.0 * rr + cc).astype(np.float32))[None, None]


def test_paper1024_equals_reference_unfold_adaptive_pool():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 256, 64, 64, generator=g)
    ours = patch_features(emb, "paper1024")
    ref = reference_paper1024(emb)
    assert ours.shape == (2, 1024, 1024)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_paper1024_hand_computed_values():
    f = patch_features(ramp_embedding(), "paper1024")  # C = 1 -> 4 values per patch
    assert f.shape == (1, 1024, 4)
    # Patch (1, 1) is centred on pixel (2, 2): window rows 0..4, cols 0..4, flattened row-major.
    p = 1 * 32 + 1
    # output 0 = entries 0..6: row 0 cols 0..4 and row 1 cols 0..1
    assert f[0, p, 0].item() == pytest.approx((0 + 1 + 2 + 3 + 4 + 100 + 101) / 7, rel=1e-6)
    # output 1 = entries 6..12: row 1 cols 1..4 and row 2 cols 0..2 (bins overlap by one entry)
    assert f[0, p, 1].item() == pytest.approx((101 + 102 + 103 + 104 + 200 + 201 + 202) / 7, rel=1e-6)
    # Patch (0, 0) is centred on (0, 0): rows/cols -2 and -1 are zero padding.
    # output 0 = entries 0..6 all lie in padded rows -> 0
    assert f[0, 0, 0].item() == 0.0
    # output 2 = entries 12..18: (0,0) (0,1) (0,2) (1,-2) (1,-1) (1,0) (1,1)
    assert f[0, 0, 2].item() == pytest.approx((0 + 1 + 2 + 0 + 0 + 100 + 101) / 7, rel=1e-6)
    # output 3 = entries 18..24: (1,1) (1,2) (2,-2) (2,-1) (2,0) (2,1) (2,2)
    assert f[0, 0, 3].item() == pytest.approx((101 + 102 + 0 + 0 + 200 + 201 + 202) / 7, rel=1e-6)
    # Last patch (31, 31) is centred on (62, 62): column 64 and row 64 are padding.
    # output 3 = entries 18..24: (63,63) (63,64)=pad, (64, 60..64)=pad
    assert f[0, 1023, 3].item() == pytest.approx((100 * 63 + 63) / 7, rel=1e-6)


def test_paper_kernels_are_seven_tap_means():
    k = paper_kernels(3)
    assert k.shape == (12, 1, 5, 5)
    flat = k.reshape(12, 25)
    bins = [(0, 7), (6, 13), (12, 19), (18, 25)]
    for ch in range(3):
        for q, (s, e) in enumerate(bins):
            expected = torch.zeros(25)
            expected[s:e] = 1 / 7
            torch.testing.assert_close(flat[4 * ch + q], expected)


def test_mean256_equals_manual_zero_padded_mean():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    f = patch_features(torch.from_numpy(emb), "mean256").numpy()
    assert f.shape == (2, 1024, 3)
    padded = np.pad(emb, ((0, 0), (0, 0), (2, 2), (2, 2)))
    manual = np.empty((2, 1024, 3), np.float64)
    for r in range(32):
        for c in range(32):
            win = padded[:, :, 2 * r : 2 * r + 5, 2 * c : 2 * c + 5]
            manual[:, r * 32 + c] = win.sum(axis=(2, 3)) / 25.0  # padding counts in the divisor
    np.testing.assert_allclose(f, manual, rtol=1e-5, atol=1e-6)
    # and one value by hand on the ramp: patch (0, 0) covers rows 0..2, cols 0..2 of real pixels
    g = patch_features(ramp_embedding(), "mean256")
    assert g[0, 0, 0].item() == pytest.approx((3 * (0 + 1 + 2) + 3 * 100 * (0 + 1 + 2)) / 25, rel=1e-6)


def test_grid_is_32x32_row_major_centred_on_even_pixels():
    rr, cc = np.indices((64, 64))
    emb = torch.from_numpy(np.stack([rr, cc]).astype(np.float32))[None]  # channel 0 = row, 1 = col
    f = patch_features(emb, "mean256")[0].numpy()  # (1024, 2)
    assert GRID == 32 and f.shape == (32 * 32, 2)
    # A symmetric 5x5 mean of a linear ramp is the centre's value (away from the zero-padded border).
    for r in range(1, 31):
        for c in range(1, 31):
            p = r * 32 + c
            assert f[p, 0] == pytest.approx(2 * r, abs=1e-4)
            assert f[p, 1] == pytest.approx(2 * c, abs=1e-4)
    # A single hot embedding pixel at (2r, 2c) = (10, 6) is seen by the patches r' in 4..6, c' in 2..4.
    hot = torch.zeros(1, 1, 64, 64)
    hot[0, 0, 10, 6] = 1.0
    for layout in ("mean256", "paper1024"):
        h = patch_features(hot, layout)[0].abs().sum(dim=1).numpy().reshape(32, 32)
        rows, cols = np.nonzero(h)
        assert set(rows.tolist()) == {4, 5, 6} and set(cols.tolist()) == {2, 3, 4}
    # in the paper layout the centre pixel is entry 12 of the window -> outputs 1 and 2 of patch (5, 3)
    hp = patch_features(hot, "paper1024")[0, 5 * 32 + 3].numpy()
    np.testing.assert_allclose(hp, [0, 1 / 7, 1 / 7, 0], atol=1e-7)


def test_feature_dim_and_bad_layout():
    assert feature_dim("paper1024") == 1024
    assert feature_dim("mean256") == 256
    with pytest.raises(ValueError, match="unknown patch layout"):
        feature_dim("mean512")
    with pytest.raises(ValueError, match="unknown patch layout"):
        patch_features(torch.zeros(1, 4, 64, 64), "mean512")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        patch_features(torch.zeros(4, 64, 64))
