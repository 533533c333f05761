"""BraTS and LiTS in a real viewer: a case folder opens as one Image per modality plus its seg as
Labels, aligned; a LiTS volume opens with its segmentation and a CT window; the widget builds a
bank from a dataset folder (progress, cancel) and scores a LiTS ground truth with its lesion label
(2), settable in the widget and stored in the layer's metadata. A fast fake backbone stands in
for LiteMedSAM (the widget's LiteMedSAM runs are in test_napari_widget.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from conftest import wait_until
from fakes import FakeBackbone
from dataset_fixtures import brats2021_root, brats2023_root, lits_root, write
from napari_mias_sam.viewer.reader import napari_get_reader
from napari_mias_sam.core.errors import InputError
from napari_mias_sam.viewer.models.layers import WORLD_FROM_RAS

PLUGIN = "napari-mias-sam"
pytestmark = [
    pytest.mark.usefixtures("mias_cache_dir"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:System theme detection:UserWarning"),
]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("napari-datasets")
    return {"b21": brats2021_root(base / "b21"), "b23": brats2023_root(base / "b23"), "lits": lits_root(base / "lits"),
            "base": base}


@pytest.fixture
def errors(monkeypatch):
    shown: list[str] = []
    import napari_mias_sam.viewer.widget as w

    monkeypatch.setattr(w, "show_error", shown.append)  # every user error goes through the widget's report_error
    return shown


def test_case_folder_opens_as_aligned_layers(make_napari_viewer, roots):
    case = roots["b21"] / "BraTS2021_00001"
    assert napari_get_reader(str(case)) is not None
    viewer = make_napari_viewer()
    layers = viewer.open(str(case), plugin=PLUGIN)
    assert [(type(la).__name__, la.name) for la in layers] == [
        ("Image", "BraTS2021_00001_flair"), ("Image", "BraTS2021_00001_t1"), ("Image", "BraTS2021_00001_t1ce"),
        ("Image", "BraTS2021_00001_t2"), ("Labels", "BraTS2021_00001_seg")]
    affine = nib.load(str(case / "BraTS2021_00001_seg.nii.gz")).affine
    seg = np.asarray(nib.load(str(case / "BraTS2021_00001_seg.nii.gz")).dataobj)
    flair = np.asarray(nib.load(str(case / "BraTS2021_00001_flair.nii.gz")).dataobj)
    for la in layers:
        assert la.data.shape == layers[0].data.shape
        np.testing.assert_allclose(la.affine.affine_matrix, layers[0].affine.affine_matrix)
    # one voxel of the lesion: the same world point in every layer, the file's values
    ijk = tuple(int(v) for v in np.argwhere(seg == 4)[0])
    world = (WORLD_FROM_RAS @ affine @ np.r_[ijk, 1.0])[:3]
    d = tuple(int(round(v)) for v in layers[-1].world_to_data(world))
    assert layers[-1].data[d] == 4 and layers[0].data[d] == flair[ijk]
    assert layers[-1].metadata["lesion_labels"] is None and layers[-1].metadata["dataset"] == "brats2021"
    assert layers[0].metadata["modality"] == "flair" and layers[0].metadata["subject"] == "BraTS2021_00001"
    # BraTS 2023 names open in the same order, as the same modalities
    new = viewer.open(str(roots["b23"] / "BraTS-GLI-00001-000"), plugin=PLUGIN)
    assert [la.metadata.get("modality") for la in new] == ["flair", "t1", "t1ce", "t2", None]
    assert new[-1].name == "BraTS-GLI-00001-000-seg"


def test_lits_volume_opens_with_its_segmentation_and_a_ct_window(make_napari_viewer, roots):
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(roots["lits"] / "volume-3.nii"), plugin=PLUGIN)
    (labels,) = viewer.open(str(roots["lits"] / "segmentation-3.nii"), plugin=PLUGIN)
    assert type(image).__name__ == "Image" and list(image.contrast_limits) == [-200.0, 250.0]
    assert image.metadata["display_window"] == "ct-abdomen"
    assert type(labels).__name__ == "Labels" and labels.name == "segmentation-3" and labels.metadata["lesion_labels"] == [2]
    np.testing.assert_allclose(image.affine.affine_matrix, labels.affine.affine_matrix)
    # the two files of a pair selected together; a folder holding one pair
    pair = viewer.open([str(roots["lits"] / "volume-1.nii.gz"), str(roots["lits"] / "segmentation-1.nii.gz")], plugin=PLUGIN)
    assert [type(la).__name__ for la in pair] == ["Image", "Labels"]
    import shutil

    one = roots["base"] / "one-pair"
    one.mkdir(exist_ok=True)
    for f in ("volume-2.nii", "segmentation-2.nii"):
        shutil.copy(roots["lits"] / f, one / f)
    vol, seg = viewer.open(str(one), plugin=PLUGIN)
    assert (vol.name, seg.name, seg.metadata["lesion_labels"]) == ("volume-2", "segmentation-2", [2])
    assert list(vol.contrast_limits) == [-200.0, 250.0]


def test_bad_case_folders(roots, tmp_path):
    with pytest.raises(InputError, match="dataset root with 4 cases"):
        napari_get_reader(str(roots["lits"]))(str(roots["lits"]))
    assert napari_get_reader(str(tmp_path)) is None  # a folder that is no dataset: not ours
    import shutil

    case = shutil.copytree(roots["b21"] / "BraTS2021_00003", tmp_path / "BraTS2021_00003")
    write(case / "BraTS2021_00003_t1.nii.gz", np.ones((155, 192, 10), np.int16), np.eye(4))
    with pytest.raises(InputError, match=r"_t1.nii.gz: image of shape \(155, 192, 10\)"):
        napari_get_reader(str(case))(str(case))


def _widget(viewer, backbone):
    from napari_mias_sam.viewer.widget import MiasSamWidget

    widget = MiasSamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MIAS-SAM")
    widget.use_backbone(backbone, device="cpu")
    return widget


def test_widget_builds_a_bank_from_a_dataset_with_cancel(make_napari_viewer, qtbot, roots, errors):
    viewer = make_napari_viewer()
    widget = _widget(viewer, FakeBackbone(name="litemedsam"))
    (roots["base"] / "train.txt").write_text("BraTS2021_00002\nBraTS2021_00003\n")
    widget.dataset_root.value = roots["b21"]
    assert "BraTS 2021" in widget.status.value and widget.preprocess.value == "mri"
    widget.ds_modality.value = "t2"
    widget.ds_margin.value = 3
    widget.ds_subjects.value = roots["base"] / "train.txt"
    # cancel: nothing changes
    job = widget.build_bank_from_dataset()
    assert job is not None and not widget.build_ds_btn.enabled
    widget.cancel()
    wait_until(qtbot, lambda: job.done, 60)
    assert widget.bank is None and "cancelled" in widget.status.value
    # build
    progress = []
    job = widget.build_bank_from_dataset()
    job.relay.progressed.connect(lambda stage, done, total: progress.append((stage, done, total)))
    wait_until(qtbot, lambda: job.done, 120)
    assert not errors, errors
    ds = widget.bank.manifest["dataset"]
    assert ds["modality"] == "t2" and ds["margin"] == 3 and ds["subjects"] == ["BraTS2021_00002", "BraTS2021_00003"]
    assert widget.bank.manifest["sources"][0]["path"].endswith("BraTS2021_00002_t2.nii.gz")
    assert any(s == "encode normal slices" and d == t for s, d, t in progress)
    assert widget.progress.value == widget.progress.max and widget.build_ds_btn.enabled
    # a bad subject list is a one-line notification
    (roots["base"] / "bad.txt").write_text("BraTS2021_99999\n")
    widget.ds_subjects.value = roots["base"] / "bad.txt"
    job = widget.build_bank_from_dataset()
    wait_until(qtbot, lambda: job.done, 60)
    assert errors and "not in the dataset" in errors[-1]


def test_widget_scores_lits_with_its_lesion_label(make_napari_viewer, qtbot, roots, errors):
    """volume-3: the liver (1) covers the prediction, the tumour (2) lies elsewhere: the live
    Dice with the LiTS lesion label is low; set to 1,2 in the widget (stored in the layer's
    metadata) it counts the liver; the FP/FN overlay follows."""
    from napari_mias_sam.jobs.bank_builds import build_bank_from_dataset

    fake = FakeBackbone(name="litemedsam")
    (roots["base"] / "lits-train.txt").write_text("volume-0\nvolume-1\n")
    bank = build_bank_from_dataset(roots["lits"], fake, subjects=roots["base"] / "lits-train.txt", layout="mean256")
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(roots["lits"] / "volume-3.nii"), plugin=PLUGIN)
    (gt,) = viewer.open(str(roots["lits"] / "segmentation-3.nii"), plugin=PLUGIN)
    widget = _widget(viewer, fake)
    widget.set_bank(bank)
    widget.image.value = image
    widget.prompt.value = "cog-point"  # the fake decoder's point masks: small squares around the prompt
    job = widget.run()
    wait_until(qtbot, lambda: job.done and widget.live is not None, 120)
    assert not errors, errors
    widget.gt.value = gt
    assert widget.lesion_labels.value == "2"
    low = widget.live.last_compare
    assert low["lesion_labels"] == [2] and "lesion = labels 2" in widget.dice_info.value
    mask = np.asarray(widget.live.layers["mask"].data) > 0
    lab = np.asarray(gt.data)
    assert mask.any() and (lab[mask] == 2).mean() < 0.05 and low["volume_dice"] < 0.1
    widget.show_errors.value = True
    overlay = np.asarray(widget.live.layers["errors"].data)
    from napari_mias_sam.viewer.models.live import FN

    assert np.array_equal(overlay == FN, (lab == 2) & ~mask)  # the liver is not a false negative
    assert widget.live.layers["errors"].metadata["mias_sam"]["lesion_labels"] == [2]
    widget.lesion_labels.value = "1,2"
    assert gt.metadata["lesion_labels"] == [1, 2]
    high = widget.live.last_compare
    assert high["volume_dice"] > 2 * low["volume_dice"] and high["lesion_labels"] == [1, 2]
    assert np.array_equal(np.asarray(widget.live.layers["errors"].data) == FN, (lab > 0) & ~mask)
    widget.lesion_labels.value = "0"
    assert errors and "background" in errors[-1] and gt.metadata["lesion_labels"] == [1, 2]
    # the CT window presets
    widget.ct_window.value = "liver"
    assert list(image.contrast_limits) == [-100.0, 200.0] and image.metadata["display_window"] == "ct-liver"
