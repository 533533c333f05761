"""NIfTI in and out: geometry kept through a round trip, atomic writes, and every kind of bad
input file refused with an InputError that names the file (inputs left byte-identical)."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from core_fixtures import oblique_affine, sha256, snapshot, write_nifti
from napari_mias_sam.data import volumes as mio
from napari_mias_sam.core.errors import InputError
from napari_mias_sam.data.volumes import (
    atomic_write_text,
    check_same_grid,
    find_volumes,
    load_labels,
    load_volume,
    nifti_stem,
    save_nifti,
)
from napari_mias_sam.method.preprocess import normalise_intensities, PREPROCESS_PRESETS, Preprocessing


@pytest.fixture()
def source(tmp_path):
    """An oblique, flipped, anisotropic float volume with qform code 1 and sform code 2."""
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 20.0, size=(9, 7, 5)).astype(np.float32)
    path = write_nifti(tmp_path / "in" / "case.nii.gz", data, oblique_affine(), qcode=1, scode=2)
    return path, data


# --------------------------------------------------------------------------- round trip
def test_round_trip_keeps_data_affine_and_codes(source, tmp_path):
    path, data = source
    vol = load_volume(path)
    assert vol.shape == (9, 7, 5) and vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, oblique_affine(), atol=1e-5)
    assert np.linalg.det(vol.affine[:3, :3]) < 0  # the flip survived
    np.testing.assert_allclose(vol.spacing, (0.8, 1.2, 2.5), atol=1e-5)
    assert vol.name == "case" and nifti_stem("a.b.nii.gz") == "a.b" and nifti_stem("x.NII") == "x"

    out = save_nifti(tmp_path / "out" / "map.nii.gz", vol.data * 2.0, vol, dtype="float32")
    back = load_volume(out)
    np.testing.assert_array_equal(back.data, data * 2.0)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    img = nib.load(str(out))
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    np.testing.assert_allclose(img.get_qform(), oblique_affine(), atol=1e-4)
    np.testing.assert_allclose(img.get_sform(), oblique_affine(), atol=1e-5)
    assert img.get_data_dtype() == np.float32
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(oblique_affine())


def test_uint8_mask_dtype_and_labels_round_trip(source, tmp_path):
    path, data = source
    vol = load_volume(path)
    mask = (data > 100).astype(np.uint8)
    out = save_nifti(tmp_path / "out" / "mask.nii.gz", mask, vol, dtype="uint8", intent="label")
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    raw = np.asarray(img.dataobj)
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw, mask)
    assert img.header.get_intent()[0] == "label"
    lab = load_labels(out, like=vol)  # same grid: accepted
    assert lab.data.dtype == np.int32
    np.testing.assert_array_equal(lab.data, mask)


def test_save_without_reference_and_wrong_shapes(tmp_path):
    p = save_nifti(tmp_path / "plain.nii", np.ones((3, 4, 5), np.float32))
    np.testing.assert_allclose(nib.load(str(p)).affine, np.eye(4))
    vol = load_volume(p)
    with pytest.raises(InputError, match="does not match the reference volume"):
        save_nifti(tmp_path / "bad.nii.gz", np.ones((3, 4, 6)), vol)
    with pytest.raises(InputError, match="must end in .nii"):
        save_nifti(tmp_path / "bad.png", np.ones((3, 4, 5)))
    assert sorted(q.name for q in tmp_path.iterdir()) == ["plain.nii"]


# --------------------------------------------------------------------------- atomic writes
def test_failed_write_keeps_previous_file_and_leaves_no_temporaries(source, tmp_path, monkeypatch):
    path, data = source
    vol = load_volume(path)
    out_dir = tmp_path / "out"
    target = save_nifti(out_dir / "map.nii.gz", data, vol)
    before = sha256(target)

    def failing_save(img, filename, *args, **kwargs):
        with open(filename, "wb") as fh:  # a partial file, then the failure
            fh.write(b"\x1f\x8b partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(mio.nib, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_nifti(target, data * 3, vol)
    assert sha256(target) == before
    assert sorted(os.listdir(out_dir)) == ["map.nii.gz"]
    with pytest.raises(OSError):
        save_nifti(out_dir / "new.nii.gz", data, vol)
    assert sorted(os.listdir(out_dir)) == ["map.nii.gz"]  # no new file, no temporary


def test_atomic_write_text(tmp_path, monkeypatch):
    target = tmp_path / "points.csv"
    atomic_write_text(target, "a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(mio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(target, "other")
    assert target.read_text() == "a,b\n1,2\n"
    assert sorted(os.listdir(tmp_path)) == ["points.csv"]


# --------------------------------------------------------------------------- bad inputs
def _check_untouched(folder, before):
    assert snapshot(folder) == before


def test_truncated_gz_is_an_input_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(1)
    good = write_nifti(tmp_path / "good.nii.gz", rng.normal(size=(32, 32, 16)).astype(np.float32))
    blob = good.read_bytes()
    for name, cut in (("half.nii.gz", len(blob) // 2), ("head.nii.gz", 100), ("tiny.nii.gz", 10)):
        bad = tmp_path / name
        bad.write_bytes(blob[:cut])
        before = snapshot(tmp_path)
        with pytest.raises(InputError) as exc:
            load_volume(bad)
        assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            load_labels(bad)
        _check_untouched(tmp_path, before)


def test_corrupt_bytes_are_an_input_error(tmp_path):
    rng = np.random.default_rng(2)
    garbage = tmp_path / "noise.nii.gz"
    garbage.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    plain = tmp_path / "noise.nii"
    plain.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    gz_text = tmp_path / "text.nii.gz"
    gz_text.write_bytes(gzip.compress(b"hello, not a NIfTI header" * 20))
    before = snapshot(tmp_path)
    for p in (garbage, plain, gz_text):
        with pytest.raises(InputError, match=p.name.replace(".", r"\.")):
            load_volume(p)
    _check_untouched(tmp_path, before)
    with pytest.raises(InputError, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match="is a folder"):
        load_volume(tmp_path)
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="not a NIfTI file name"):
        load_volume(tmp_path / "x.png")


def test_wrong_dimensions(tmp_path):
    p2 = write_nifti(tmp_path / "slice.nii.gz", np.ones((16, 16), np.float32))
    p4 = write_nifti(tmp_path / "series.nii.gz", np.ones((8, 8, 8, 2), np.float32))
    p41 = write_nifti(tmp_path / "single.nii.gz", np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4, 1))
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"slice\.nii\.gz: has 2 dimensions \(16, 16\), expected a 3D volume"):
        load_volume(p2)
    with pytest.raises(InputError, match=r"series\.nii\.gz: has 4 dimensions \(8, 8, 8, 2\), expected a 3D volume"):
        load_volume(p4)
    with pytest.raises(InputError, match="has 4 dimensions"):
        load_labels(p4)
    one = load_volume(p41)  # a 4D file holding one volume is that volume
    assert one.shape == (8, 8, 4)
    np.testing.assert_array_equal(one.data, np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4))
    _check_untouched(tmp_path, before)


def test_nan_and_inf_volumes(tmp_path):
    data = np.ones((8, 8, 4), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    p = write_nifti(tmp_path / "nan.nii.gz", data)
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"nan\.nii\.gz: 2 voxels are NaN or infinite"):
        load_volume(p)
    assert np.isnan(load_volume(p, allow_nan=True).data[1, 2, 3])
    with pytest.raises(InputError, match="NaN or infinite"):
        load_labels(p)
    with pytest.raises(InputError, match="NaN or infinite"):
        normalise_intensities(data, Preprocessing())
    _check_untouched(tmp_path, before)


@pytest.mark.parametrize("preset", sorted(PREPROCESS_PRESETS))
def test_constant_volume_is_refused_by_preprocessing(preset):
    with pytest.raises(InputError, match="same value"):
        normalise_intensities(np.full((8, 8, 3), 7.0, np.float32), PREPROCESS_PRESETS[preset], source="flat.nii.gz")


def test_constant_slice_becomes_zeros_with_per_slice_scope():
    data = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    data[1] = 5.0
    out = normalise_intensities(data, Preprocessing(mode="minmax", scope="slice"))
    assert (out[1] == 0).all() and out[0].min() == 0.0 and out[0].max() == 1.0


def test_ground_truth_on_another_grid(source, tmp_path):
    path, data = source
    vol = load_volume(path)
    lab = (data > 100).astype(np.uint8)
    other_shape = write_nifti(tmp_path / "gt_shape.nii.gz", lab[:, :, :4], oblique_affine())
    shifted = oblique_affine()
    shifted[0, 3] += 1.5
    other_affine = write_nifti(tmp_path / "gt_affine.nii.gz", lab, shifted)
    fractional = write_nifti(tmp_path / "gt_prob.nii.gz", np.where(lab > 0, 0.7, 0.0).astype(np.float32), oblique_affine())
    good = write_nifti(tmp_path / "gt_good.nii.gz", lab.astype(np.float32), oblique_affine())
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"gt_shape\.nii\.gz: shape \(9, 7, 4\) differs from the image"):
        load_labels(other_shape, like=vol)
    with pytest.raises(InputError, match=r"gt_affine\.nii\.gz: affine differs from the image .* 1\.5 mm"):
        load_labels(other_affine, like=vol)
    with pytest.raises(InputError, match="non-integer values"):
        load_labels(fractional)
    np.testing.assert_array_equal(load_labels(good, like=vol).data, lab)
    with pytest.raises(InputError, match="differs"):
        check_same_grid(load_labels(other_shape), vol)
    _check_untouched(tmp_path, before)


def test_find_volumes(tmp_path):
    d = tmp_path / "vols"
    for n in ("b.nii.gz", "a.nii", "notes.txt"):
        (d / n).parent.mkdir(exist_ok=True)
        (d / n).write_bytes(b"x")
    assert [p.name for p in find_volumes([d])] == ["a.nii", "b.nii.gz"]
    with pytest.raises(InputError, match="no .nii or .nii.gz files"):
        find_volumes([_empty(tmp_path)])
    with pytest.raises(InputError, match="not a NIfTI file"):
        find_volumes([d / "notes.txt"])
    with pytest.raises(InputError, match="no such file or folder"):
        find_volumes([tmp_path / "nope"])


def _empty(tmp_path):
    e = tmp_path / "empty"
    e.mkdir()
    return e
