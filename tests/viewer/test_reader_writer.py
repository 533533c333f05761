"""The NIfTI reader and writer in a real viewer: layer types, exact geometry on non-identity
affines (oblique, tilted, flipped, anisotropic, permuted axes), and round trips through the writer."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest

from napari_mias_sam.viewer.reader import napari_get_reader
from napari_mias_sam.core.errors import InputError
from napari_mias_sam.viewer.models.layers import (
    WORLD_FROM_RAS,
    display_axes,
    looks_like_segmentation,
    volume_from_layer,
)

PLUGIN = "napari-mias-sam"


@pytest.fixture
def volume_files(tmp_path, save_test_nifti, tilted_affine):
    """An int16 image, its 2-label ground truth (``*_seg``), an unnamed 0/1 mask, a float
    probability map named ``*_mask_prob``, all on the same oblique grid (shape 12 x 10 x 5)."""
    rng = np.random.default_rng(0)
    shape = (12, 10, 5)
    img = (rng.normal(300, 80, shape)).astype(np.int16)
    seg = np.zeros(shape, np.uint8)
    seg[3:6, 2:5, 1:3] = 1
    seg[8:10, 6:8, 3] = 2
    unnamed = (seg > 0).astype(np.uint8)
    prob = rng.random(shape).astype(np.float32)
    return {
        "image": save_test_nifti(tmp_path / "subj.nii.gz", img, tilted_affine),
        "seg": save_test_nifti(tmp_path / "subj_seg.nii.gz", seg, tilted_affine),
        "unnamed": save_test_nifti(tmp_path / "subj_binary.nii", unnamed, tilted_affine),
        "prob": save_test_nifti(tmp_path / "subj_mask_prob.nii.gz", prob, tilted_affine),
        "arrays": {"image": img, "seg": seg, "unnamed": unnamed, "prob": prob},
        "affine": tilted_affine,
    }


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    """Where voxel ``ijk`` of the file lies in napari's world frame (S, P, L mm)."""
    return (WORLD_FROM_RAS @ affine @ np.r_[np.asarray(ijk, float), 1.0])[:3]


def test_get_reader_claims_nifti_only(volume_files, tmp_path):
    assert napari_get_reader(str(volume_files["image"])) is not None
    assert napari_get_reader([str(volume_files["image"]), str(volume_files["seg"])]) is not None
    assert napari_get_reader(str(tmp_path / "image.tif")) is None
    assert napari_get_reader([str(volume_files["image"]), str(tmp_path / "x.png")]) is None


def test_layer_types(make_napari_viewer, volume_files):
    viewer = make_napari_viewer()
    kinds = {}
    for key in ("image", "seg", "unnamed", "prob"):
        (layer,) = viewer.open(str(volume_files[key]), plugin=PLUGIN)
        kinds[key] = type(layer).__name__
    assert kinds == {"image": "Image", "seg": "Labels", "unnamed": "Labels", "prob": "Image"}


def test_geometry_and_overlay_on_oblique_flipped_affine(make_napari_viewer, volume_files):
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(volume_files["image"]), plugin=PLUGIN)
    (labels,) = viewer.open(str(volume_files["seg"]), plugin=PLUGIN)
    aff, arrays = volume_files["affine"], volume_files["arrays"]
    axes = image.metadata["display_axes"]
    # Axial (the tilted z axis) first, then A-P, then L-R.
    assert axes == (2, 1, 0)
    assert image.data.shape == tuple(arrays["image"].shape[a] for a in axes)
    # Source geometry kept in the metadata.
    np.testing.assert_allclose(image.metadata["affine"], aff)
    assert isinstance(image.metadata["header"], nib.Nifti1Header)
    assert image.metadata["path"] == str(volume_files["image"])
    shape = arrays["image"].shape
    for ijk in itertools.product(*[(0, n - 1) for n in shape]):  # every corner voxel
        d = tuple(ijk[a] for a in axes)
        # same voxel values ...
        assert image.data[d] == arrays["image"][ijk]
        assert labels.data[d] == arrays["seg"][ijk]
        # ... at the file's world position, for the image and its ground truth alike
        np.testing.assert_allclose(image.data_to_world(d), _world(aff, ijk), atol=1e-6)
        np.testing.assert_allclose(labels.data_to_world(d), _world(aff, ijk), atol=1e-6)
    # A world point maps back to the same voxel in both layers (they overlay exactly).
    w = _world(aff, (4, 3, 2))
    np.testing.assert_allclose(image.world_to_data(w), (2, 3, 4), atol=1e-6)
    np.testing.assert_allclose(labels.world_to_data(w), (2, 3, 4), atol=1e-6)


def test_permuted_file_axes(make_napari_viewer, tmp_path, save_test_nifti):
    """A file whose voxel axis 0 is S-I (e.g. a coronal acquisition saved slice-first)."""
    aff = np.array([[0, 0, -0.8, 40.0], [0, 1.2, 0, -30.0], [2.5, 0, 0, -10.0], [0, 0, 0, 1]], float)
    data = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    path = save_test_nifti(tmp_path / "perm.nii.gz", data, aff)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    assert display_axes(aff) == (0, 1, 2)
    assert layer.data.shape == (4, 6, 5)
    np.testing.assert_allclose(layer.data_to_world((3, 5, 4)), _world(aff, (3, 5, 4)), atol=1e-6)
    # The slider axis is world S: moving one slice moves 2.5 mm along S.
    s0 = layer.data_to_world((0, 0, 0))
    s1 = layer.data_to_world((1, 0, 0))
    np.testing.assert_allclose(np.asarray(s1) - np.asarray(s0), [2.5, 0, 0], atol=1e-6)


def test_writer_round_trip_labels_and_image(make_napari_viewer, volume_files, tmp_path):
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(volume_files["image"]), plugin=PLUGIN)
    (labels,) = viewer.open(str(volume_files["seg"]), plugin=PLUGIN)
    labels.data[0, 0, 0] = 2  # an edit made in the viewer must be saved where it was made
    out_l = tmp_path / "out" / "edited_seg.nii.gz"
    out_i = tmp_path / "out" / "image_copy.nii.gz"
    assert labels.save(str(out_l), plugin=PLUGIN)
    assert image.save(str(out_i), plugin=PLUGIN)
    src = nib.load(str(volume_files["seg"]))
    back = nib.load(str(out_l))
    expected = volume_files["arrays"]["seg"].copy()
    expected[0, 0, 0] = 2  # display (0, 0, 0) is file (0, 0, 0) whatever the axis order
    np.testing.assert_array_equal(np.asarray(back.dataobj), expected)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)
    assert int(back.header["sform_code"]) == 2 and int(back.header["qform_code"]) == 1
    np.testing.assert_allclose(back.header.get_zooms(), src.header.get_zooms(), atol=1e-6)
    img_back = nib.load(str(out_i))
    np.testing.assert_array_equal(img_back.get_fdata(), volume_files["arrays"]["image"].astype(float))
    np.testing.assert_allclose(img_back.affine, src.affine, atol=1e-6)
    # Re-opening the written files gives the same layers at the same place.
    (again,) = viewer.open(str(out_l), plugin=PLUGIN)
    np.testing.assert_array_equal(again.data, labels.data)
    np.testing.assert_allclose(again.affine.affine_matrix, labels.affine.affine_matrix, atol=1e-6)


def test_writer_for_a_layer_made_in_napari(make_napari_viewer, tmp_path):
    """A Labels layer with scale/translate but no NIfTI metadata keeps its world placement."""
    viewer = make_napari_viewer()
    data = np.zeros((3, 4, 5), np.uint8)
    data[1, 2, 3] = 1
    layer = viewer.add_labels(data, scale=(3.0, 0.5, 0.7), translate=(10.0, -4.0, 2.0))
    out = tmp_path / "drawn"
    (written,) = layer.save(str(out), plugin=PLUGIN)
    assert written.endswith(".nii.gz")
    (back,) = viewer.open(written, plugin=PLUGIN)
    assert type(back).__name__ == "Labels"
    ones = np.argwhere(back.data == 1)
    assert len(ones) == 1
    np.testing.assert_allclose(back.data_to_world(ones[0]), layer.data_to_world((1, 2, 3)), atol=1e-6)


def test_other_dimensionalities_and_bad_files(make_napari_viewer, tmp_path, save_test_nifti, tilted_affine):
    viewer = make_napari_viewer()
    single = save_test_nifti(tmp_path / "single4d.nii.gz", np.ones((6, 5, 4, 1), np.float32) * np.arange(4)[None, None, :, None], tilted_affine)
    (layer,) = viewer.open(str(single), plugin=PLUGIN)
    assert layer.data.ndim == 3 and layer.metadata["display_axes"] == (2, 1, 0)
    flat = save_test_nifti(tmp_path / "flat.nii.gz", np.random.default_rng(1).random((8, 9)).astype(np.float32), np.eye(4))
    (layer2d,) = viewer.open(str(flat), plugin=PLUGIN)
    assert layer2d.data.shape == (8, 9)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(InputError, match="broken.nii.gz"):
        napari_get_reader(str(bad))(str(bad))


def test_segmentation_heuristics(tmp_path):
    ints = np.zeros((20, 20, 4), np.int16)
    assert looks_like_segmentation(tmp_path / "x_gt.nii.gz", ints)
    assert looks_like_segmentation(tmp_path / "liver_label.nii", ints)
    ct = np.random.default_rng(0).integers(-1000, 1000, (20, 20, 4)).astype(np.int16)
    assert not looks_like_segmentation(tmp_path / "ct.nii.gz", ct)
    assert looks_like_segmentation(tmp_path / "unnamed.nii.gz", (ct > 0).astype(np.float32))
    assert not looks_like_segmentation(tmp_path / "brain_mask_prob.nii.gz", np.full((4, 4, 4), 0.5, np.float32))


def test_volume_from_layer_restores_file_order(volume_files):
    from napari_mias_sam.viewer.models.layers import read_nifti_layers

    ((data, kwargs, kind),) = read_nifti_layers(volume_files["image"])
    vol, axes = volume_from_layer(data, kwargs["metadata"], None)
    np.testing.assert_array_equal(vol.data, volume_files["arrays"]["image"].astype(np.float32))
    np.testing.assert_allclose(vol.affine, volume_files["affine"])
    assert axes == (2, 1, 0)
    with pytest.raises(InputError, match="3D"):
        volume_from_layer(np.zeros((4, 5)), None, None, name="flat")
