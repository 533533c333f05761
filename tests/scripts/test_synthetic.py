"""Behaviour of the synthetic-data helpers (augmentation, lesions, geometry). Fast: small arrays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import synthetic  # tools/synthetic.py (pytest puts tools/ on sys.path)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _ball(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    centre = (np.asarray(shape) - 1) / 2.0
    grid = np.indices(shape).astype(float)
    return ((grid - centre[:, None, None, None]) ** 2).sum(axis=0) <= radius**2


def _phantom(shape: tuple[int, int, int] = (40, 44, 36)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 'brain': a ball of tissue with a gradient and a darker core."""
    mask = _ball(shape, 15.0)
    image = np.where(mask, 100.0, 0.0).astype(np.float32)
    image += np.where(mask, np.linspace(0, 20, shape[0])[:, None, None], 0.0).astype(np.float32)
    image[_ball(shape, 5.0)] = 40.0
    return image, mask


# ---------------------------------------------------------------------------- bias field


def test_bias_field_positive_smooth_and_centred_on_one() -> None:
    field = synthetic.random_bias_field((32, 36, 28), _rng(1), strength=0.2)
    assert field.shape == (32, 36, 28)
    assert field.dtype == np.float32
    assert np.all(field > 0)
    assert np.exp(-0.2) - 1e-5 <= field.min() and field.max() <= np.exp(0.2) + 1e-5
    assert abs(float(np.log(field).mean())) < 1e-3  # centred on 1 in log scale
    # Smooth: neighbouring voxels differ by a tiny fraction of the field's range.
    steps = max(float(np.abs(np.diff(field, axis=a)).max()) for a in range(3))
    assert steps < 0.1 * float(field.max() - field.min())


def test_bias_field_zero_strength_is_one() -> None:
    field = synthetic.random_bias_field((8, 8, 8), _rng(), strength=0.0)
    np.testing.assert_allclose(field, 1.0)


# ---------------------------------------------------------------------------- spatial


def test_elastic_deform_keeps_constant_image_constant() -> None:
    vol = np.full((30, 30, 20), 7.5, dtype=np.float32)
    out = synthetic.elastic_deform(vol, _rng(2), alpha=2.0, sigma=6.0)
    interior = (slice(6, -6),) * 3  # away from the edge, where samples may fall outside
    np.testing.assert_allclose(out[interior], 7.5, rtol=1e-5)


def test_same_field_maps_mask_to_binary_and_follows_image() -> None:
    image, mask = _phantom()
    field = synthetic.elastic_displacement(image.shape, _rng(3), alpha=2.0, sigma=6.0)
    warped_mask = synthetic.warp(mask.astype(np.uint8), displacement=field, order=0)
    warped_image = synthetic.warp(image, displacement=field, order=1)
    assert warped_mask.dtype == np.uint8
    assert set(np.unique(warped_mask)) <= {0, 1}
    assert warped_mask.sum() > 0.8 * mask.sum()
    # The image's tissue moved with the mask: almost no tissue outside the warped mask.
    tissue = warped_image > 50
    assert (tissue & (warped_mask == 0)).sum() < 0.05 * tissue.sum()


def test_elastic_deform_same_seed_same_field() -> None:
    image, mask = _phantom()
    a = synthetic.elastic_deform(image, _rng(4), alpha=2.0, sigma=6.0)
    b = synthetic.elastic_deform(image, _rng(4), alpha=2.0, sigma=6.0)
    m = synthetic.elastic_deform(mask.astype(np.uint8), _rng(4), alpha=2.0, sigma=6.0, order=0)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(m)) <= {0, 1}
    assert not np.array_equal(a, synthetic.elastic_deform(image, _rng(5), alpha=2.0, sigma=6.0))


def test_identity_affine_warp_is_identity() -> None:
    image, _ = _phantom()
    np.testing.assert_allclose(synthetic.warp(image, affine=np.eye(4)), image, atol=1e-4)


def test_random_affine_is_small() -> None:
    m = synthetic.random_affine((40, 40, 40), _rng(6), max_rotation_deg=3.0, max_scale=0.02, max_shift=1.0)
    assert m.shape == (4, 4)
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])
    assert np.abs(m[:3, :3] - np.eye(3)).max() < 0.08
    centre = np.array([19.5, 19.5, 19.5, 1.0])
    assert np.abs((m @ centre)[:3] - centre[:3]).max() <= 1.0 + 1e-6


# ---------------------------------------------------------------------------- intensity


def test_intensity_curve_monotone_keeps_zero() -> None:
    vol = np.linspace(0, 200, 1000, dtype=np.float32).reshape(10, 10, 10)
    out = synthetic.intensity_curve(vol, _rng(7), gamma_range=(0.7, 0.7))
    assert out[0, 0, 0] == 0
    assert np.all(np.diff(out.ravel()) >= 0)
    assert not np.allclose(out, vol)


def test_rician_noise_respects_mask() -> None:
    image, mask = _phantom()
    noisy = synthetic.rician_noise(image, _rng(8), std=3.0, mask=mask)
    np.testing.assert_array_equal(noisy[~mask], image[~mask])
    assert 1.5 < float((noisy - image)[mask].std()) < 4.5


def test_pseudo_subject_shapes_and_background() -> None:
    image, mask = _phantom()
    out, out_mask = synthetic.pseudo_subject(image, mask, _rng(9), elastic_sigma=6.0)
    assert out.shape == image.shape and out.dtype == np.float32
    assert out_mask.dtype == bool and out_mask.shape == mask.shape
    assert np.all(out[~out_mask] == 0)
    assert 0.8 * mask.sum() < out_mask.sum() < 1.25 * mask.sum()
    again, _ = synthetic.pseudo_subject(image, mask, _rng(9), elastic_sigma=6.0)
    np.testing.assert_array_equal(out, again)


# ---------------------------------------------------------------------------- lesions


@pytest.mark.parametrize("irregularity", [0.0, 0.5, 1.5])
def test_lesion_mask_non_empty_inside_ellipsoid(irregularity: float) -> None:
    shape = (40, 50, 30)
    centre, radii = (20.0, 22.0, 14.0), (8.0, 11.0, 6.0)
    mask = synthetic.make_lesion_mask(shape, centre, radii, _rng(10), irregularity=irregularity)
    assert mask.dtype == bool and mask.shape == shape
    assert mask.any()
    idx = np.argwhere(mask).astype(float)
    r2 = (((idx - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(axis=1)
    assert np.all(r2 < 1.0)
    assert ndimage.label(mask)[1] == 1  # one piece


def test_lesion_mask_is_irregular_but_deterministic() -> None:
    args = ((40, 40, 40), (20.0, 20.0, 20.0), (10.0, 10.0, 10.0))
    a = synthetic.make_lesion_mask(*args, _rng(11), irregularity=0.8)
    b = synthetic.make_lesion_mask(*args, _rng(11), irregularity=0.8)
    c = synthetic.make_lesion_mask(*args, _rng(12), irregularity=0.8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    smooth = synthetic.make_lesion_mask(*args, _rng(11), irregularity=0.0)
    assert not np.array_equal(a, smooth)


@pytest.mark.parametrize("contrast", [0.6, -0.5])
def test_insert_lesion_changes_only_mask_and_halo_with_sign(contrast: float) -> None:
    image, brain = _phantom()
    image = (image + 60.0 * brain).astype(np.float32)  # tissue at 100-180, away from 0
    lesion = synthetic.make_lesion_mask(image.shape, (20.0, 26.0, 18.0), (5.0, 5.0, 4.0), _rng(13))
    halo = 3.0
    out = synthetic.insert_lesion(image, lesion, contrast=contrast, rng=_rng(14), halo=halo)
    changed = out != image
    near = ndimage.distance_transform_edt(~lesion) <= halo
    assert changed.any()
    assert not (changed & ~near).any()
    diff = out - image
    if contrast > 0:
        assert diff.min() >= 0 and diff[lesion].mean() > 0.3 * float(np.median(image[lesion]))
    else:
        assert diff.max() <= 0 and diff[lesion].mean() < -0.2 * float(np.median(image[lesion]))
    # The halo is weaker than the core.
    ring = near & ~lesion
    assert np.abs(diff[ring]).mean() < np.abs(diff[lesion]).mean()


def test_insert_lesion_without_halo_stays_in_mask_and_is_deterministic() -> None:
    image, _ = _phantom()
    lesion = synthetic.make_lesion_mask(image.shape, (20.0, 26.0, 18.0), (5.0, 5.0, 4.0), _rng(15))
    a = synthetic.insert_lesion(image, lesion, contrast=0.8, rng=_rng(16), halo=0.0)
    b = synthetic.insert_lesion(image, lesion, contrast=0.8, rng=_rng(16), halo=0.0)
    np.testing.assert_array_equal(a, b)
    assert not ((a != image) & ~lesion).any()
    np.testing.assert_array_equal(synthetic.insert_lesion(image, lesion, contrast=0.0, rng=_rng()), image)


def test_random_lesion_centre_fits_ellipsoid_inside_region() -> None:
    _, brain = _phantom()
    radii = (4.0, 5.0, 3.0)
    for seed in range(5):
        centre = synthetic.random_lesion_centre(brain, radii, _rng(seed))
        blob = synthetic.make_lesion_mask(brain.shape, centre, radii, _rng(seed), irregularity=0.0)
        assert brain[centre]
        assert not (blob & ~brain).any()


def test_add_random_lesions_labels_and_count() -> None:
    image, brain = _phantom((48, 48, 40))
    out, labels = synthetic.add_random_lesions(
        image, brain, _rng(17), count=2, radius_range=(3.0, 4.0), contrast=(0.7, -0.5), halo=2.0
    )
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1}
    assert not (labels.astype(bool) & ~brain).any()
    assert ndimage.label(labels)[1] == 2
    assert (out[labels == 1] != image[labels == 1]).any()
    with pytest.raises(ValueError):
        synthetic.add_random_lesions(image, brain, _rng(), count=2, contrast=(0.5,))


# ---------------------------------------------------------------------------- geometry


def test_crop_with_affine_keeps_world_positions() -> None:
    vol = np.arange(10 * 12 * 8, dtype=np.float32).reshape(10, 12, 8)
    affine = np.array([[1.0, 0, 0, -90], [0, 1.0, 0, -126], [0, 0, 1.0, -72], [0, 0, 0, 1]])
    out, new = synthetic.crop_with_affine(vol, affine, (2, 3, -1), (7, 12, 5))
    assert out.shape == (5, 9, 6)
    assert out[0, 0, 0] == 0  # z = -1 lies outside the source: padded
    assert out[0, 0, 1] == vol[2, 3, 0]
    np.testing.assert_allclose(new @ [0, 0, 1, 1], affine @ [2, 3, 0, 1])


def test_thick_slices_average_and_affine() -> None:
    vol = np.zeros((4, 5, 12), dtype=np.float32)
    vol[..., :] = np.arange(12, dtype=np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-90, -126, -72)
    out, new = synthetic.thick_slices(vol, affine, factor=4)
    assert out.shape == (4, 5, 3)
    np.testing.assert_allclose(out[0, 0], [1.5, 5.5, 9.5])
    np.testing.assert_allclose(np.sqrt((new[:3, :3] ** 2).sum(axis=0)), [1, 1, 4])
    # A thick voxel sits at the centre of the thin slices it merged.
    np.testing.assert_allclose(new @ [0, 0, 1, 1], affine @ [0, 0, 5.5, 1])
    labels = (vol >= 10).astype(np.uint8)
    merged, _ = synthetic.thick_slices(labels, affine, factor=4, reduce="max")
    np.testing.assert_array_equal(merged[0, 0], [0, 0, 1])
