"""Reviewing prompt placement in a real napari viewer with the real LiteMedSAM, driven by key
presses on the canvas: the statuses and their colours, a rejected slice's mask cleared, the dock's
review line, the QA columns in the CoG layer, a rerun keeping corrections and rejections, saving
(the dock's "Save results" and File > Save Selected Layers), reopening the results folder and a
run restoring the review. The last test reviews the whole bundled case from the keyboard, timed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from qtpy.QtCore import Qt

from conftest import SAMPLE_DIR, layer_named as _layer, settle_live as _settle, wait_until
from napari_mias_sam.data.qa_table import read_qa
from test_qa import PLUGIN, choose, click, qa_result, shown, viewer_widget  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.usefixtures("mias_cache_dir"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:System theme detection:UserWarning"),
]

KEYS = {"a": Qt.Key.Key_A, "r": Qt.Key.Key_R, "u": Qt.Key.Key_U, "n": Qt.Key.Key_N, "b": Qt.Key.Key_B}
GREEN, ORANGE, GREY, RED = [0.0, 1.0, 0.0, 1.0], [1.0, 165 / 255, 0.0, 1.0], [128 / 255, 128 / 255, 128 / 255, 1.0], [1.0, 0.0, 0.0, 1.0]


def press(qtbot, viewer, key: str) -> None:
    """A key press on the canvas, as a user types it with the CoG layer active."""
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, KEYS[key])


def _colour(points, s: int) -> np.ndarray:
    return points.face_color[list(points.features["slice"]).index(s)]


def _docked(viewer, image, bank, backbone):
    """The widget docked from the plugin menu, holding ``backbone`` and ``bank``, ``image`` chosen."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "MIAS-SAM")
    widget.use_backbone(backbone, device="cpu")
    widget.set_bank(bank)
    widget.image.value = image
    return widget


def _run(qtbot, widget, timeout: float = 300) -> None:
    click(qtbot, widget, "Run MIAS-SAM")
    wait_until(qtbot, lambda: widget.job.done, timeout=timeout)
    _settle(qtbot, widget)


def _mask_slice(viewer, widget, s: int) -> np.ndarray:
    return np.asarray(_layer(viewer, " mask").data[widget.live.session.slice_index(s)])


def test_review_by_keys_save_rerun_and_reopen(shown, qtbot, tmp_path, make_napari_viewer, sample_bank, lite_backbone, sample_subset):
    viewer, widget, image, gt = shown
    points = _layer(viewer, " CoG")
    live, ses = widget.live, widget.live.session
    assert viewer.layers.selection.active is points
    assert list(points.features["status"]) == ["pending"] * 3
    choose(widget, "ground truth", gt.name)
    _settle(qtbot, widget)

    live.jump_to(0)
    press(qtbot, viewer, "a")  # accept slice 0
    assert ses.status(0) == "accepted" and not len(points.selected_data)  # our 'a', not napari's select-all
    np.testing.assert_allclose(_colour(points, 0), GREEN, atol=1e-3)
    assert "reviewed 1 of 3 prompted slices: 1 accepted, 0 corrected, 0 rejected, 2 pending. Slice 0: accepted." in widget.review_info.value
    press(qtbot, viewer, "n")  # the next pending slice
    assert live.current_slice() == 1
    assert _mask_slice(viewer, widget, 1).any()
    press(qtbot, viewer, "r")  # reject: "no anomaly here"
    _settle(qtbot, widget)
    assert ses.status(1) == "rejected" and not _mask_slice(viewer, widget, 1).any()
    np.testing.assert_allclose(_colour(points, 1), GREY, atol=1e-3)
    press(qtbot, viewer, "n")
    assert live.current_slice() == 2
    # Drag slice 2's point 10 voxels: corrected (orange), decoded there.
    row = list(points.features["slice"]).index(2)
    data = points.data.copy()
    inplane = [a for a in range(3) if a != ses.display_axis]
    data[row, inplane[0]] += 10.0
    points.data = data
    _settle(qtbot, widget)
    assert ses.status(2) == "corrected"
    np.testing.assert_allclose(_colour(points, 2), ORANGE, atol=1e-3)
    # Reset brings back the method's point; b / n with nothing else pending stay on it.
    press(qtbot, viewer, "u")
    _settle(qtbot, widget)
    assert ses.status(2) == "pending" and 2 not in ses.overrides
    np.testing.assert_allclose(_colour(points, 2), RED, atol=1e-3)
    press(qtbot, viewer, "b")
    assert live.current_slice() == 2
    points.data = data  # corrected again
    _settle(qtbot, widget)
    feats = points.features.set_index("slice")
    assert list(feats["status"]) == ["accepted", "rejected", "corrected"]
    assert feats.loc[2, "displacement_mm"] == pytest.approx(10.0 * ses.result.volume.spacing[inplane[0]], rel=0.05)
    assert feats.loc[0, "displacement_mm"] == 0.0 and not np.isnan(feats.loc[0, "slice_dice_before"])
    assert "0 pending" in widget.review_info.value

    # Save: the dock's button, and File > Save Selected Layers on the CoG layer (the plugin's writer).
    widget.results_folder.value = tmp_path / "results"
    click(qtbot, widget, "Save results")
    saved = read_qa(tmp_path / "results" / "case_01_qa.csv")
    assert [saved.status(s) for s in range(3)] == ["accepted", "rejected", "corrected"]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "case_01_anomaly.nii.gz", "case_01_lesions.csv", "case_01_lesions.nii.gz", "case_01_mask.nii.gz",
        "case_01_points.csv", "case_01_qa.csv"]
    viewer.layers.selection.active = points
    viewer.layers.save(str(tmp_path / "cog.csv"), selected=True, plugin=PLUGIN)
    assert (tmp_path / "cog_qa.csv").read_text() == (tmp_path / "results" / "case_01_qa.csv").read_text()

    # A rerun (the real button) keeps the corrections and the rejection.
    _run(qtbot, widget)
    ses2 = widget.live.session
    assert ses2 is not ses and [ses2.status(s) for s in range(3)] == ["accepted", "rejected", "corrected"]
    assert not _mask_slice(viewer, widget, 1).any()
    np.testing.assert_allclose(_layer(viewer, " CoG").data[row], data[row], atol=1e-2)

    # Reopen in a new viewer: the results folder gives mask, map and the reviewed points; a run restores the review.
    v2 = make_napari_viewer()
    (img2,) = v2.open(str(sample_subset["case"]), plugin=PLUGIN)
    opened = v2.open(str(tmp_path / "results"), plugin=PLUGIN)
    assert [type(lay).__name__ for lay in opened] == ["Image", "Labels", "Points"]
    pts2 = opened[-1]
    assert list(pts2.features["status"]) == ["accepted", "rejected", "corrected"]
    np.testing.assert_allclose(pts2.data, _layer(viewer, " CoG").data, atol=0.02)
    np.testing.assert_allclose(pts2.data_to_world(pts2.data[0]), _layer(viewer, " CoG").data_to_world(_layer(viewer, " CoG").data[0]), atol=0.02)
    w2 = _docked(v2, img2, sample_bank, lite_backbone)
    w2.prompt.value = "cog-box"  # the prompt the review was made with (this small bank's default is regions)
    _run(qtbot, w2)
    ses3 = w2.live.session
    assert [ses3.status(s) for s in range(3)] == ["accepted", "rejected", "corrected"]
    assert "review restored from" in w2.status.value
    np.testing.assert_allclose(_layer(v2, "case_01 CoG").data, pts2.data, atol=0.02)
    run_mask = w2.live.layers["mask"]  # the run's (the reopened one is beside it)
    assert not np.asarray(run_mask.data[ses3.slice_index(1)]).any() and np.asarray(run_mask.data[ses3.slice_index(0)]).any()


@pytest.fixture(scope="session")
def whole_case_bank(lite_backbone, mias_cache_dir):
    """A bank of the bundled normal_01 (14 slices at the cases' levels)."""
    from napari_mias_sam.jobs.bank_builds import build_bank_from_files
    from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS

    return build_bank_from_files([SAMPLE_DIR / "normal_01.nii.gz"], lite_backbone, preprocessing=PREPROCESS_PRESETS["mri"])


@pytest.mark.slow
def test_the_bundled_case_reviewed_from_the_keyboard(make_napari_viewer, qtbot, tmp_path, whole_case_bank, lite_backbone, capsys):
    """The whole bundled case_01 (16 slices): every prompt reviewed by key presses (r on slices
    the ground truth shows lesion-free, a on the others), n to the next pending slice, then saved
    and summarised by qa-report. Prints the review time (first key to saved results)."""
    from napari_mias_sam.cli.commands import main

    viewer = make_napari_viewer(show=True)
    (image,) = viewer.open(str(SAMPLE_DIR / "case_01.nii.gz"), plugin=PLUGIN)
    (gt,) = viewer.open(str(SAMPLE_DIR / "case_01_seg.nii.gz"), plugin=PLUGIN)
    widget = _docked(viewer, image, whole_case_bank, lite_backbone)
    _run(qtbot, widget, timeout=600)
    choose(widget, "ground truth", gt.name)
    _settle(qtbot, widget)
    live, ses = widget.live, widget.live.session
    lesion = np.asarray(gt.data) != 0
    prompted = ses.review_counts()["prompted"]
    assert prompted >= 10

    t0 = time.perf_counter()
    live.jump_to(0)
    keys = 0
    if ses.status(live.current_slice()) != "pending":
        press(qtbot, viewer, "n")
        keys += 1
    while ses.review_counts()["pending"]:
        s = live.current_slice()
        on_lesion_slice = np.take(lesion, s, axis=ses.display_axis).any()
        press(qtbot, viewer, "r" if not on_lesion_slice else "a")
        press(qtbot, viewer, "n")
        keys += 2
        assert keys <= 4 * prompted
    _settle(qtbot, widget)
    widget.results_folder.value = tmp_path / "results"
    click(qtbot, widget, "Save results")
    took = time.perf_counter() - t0
    counts = ses.review_counts()
    assert counts["pending"] == 0 and counts["rejected"] >= 1 and counts["accepted"] >= 1
    for s in range(ses.n_slices):
        if ses.status(s) == "rejected":
            assert not _mask_slice(viewer, widget, s).any()
    assert main(["qa-report", str(tmp_path / "results"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["volumes"][0]
    assert (rep["reviewed"], rep["rejected"], rep["pending"]) == (prompted, counts["rejected"], 0)
    rows = read_qa(tmp_path / "results" / "case_01_qa.csv").rows
    lesion_rows = [r for r in rows if r["has_lesion"]]
    assert rep["slice_dice_after"] == pytest.approx(np.mean([r["slice_dice_after"] for r in lesion_rows]))
    with capsys.disabled():
        print(f"\nkeyboard review of the bundled case_01: {prompted} prompted slices, {keys} key presses, "
              f"{took:.1f} s from the first key to the saved results ({counts})")
