"""The dock's Lesions section in a real napari viewer (real LiteMedSAM on the bundled case): the
table and the lesion-id Labels layer, sorting, a row click that moves the viewer to the lesion,
matched / false positive against the ground truth, rejecting a lesion (out of the mask, the
table and the saved files) and accepting one."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from qtpy.QtCore import Qt

from conftest import layer_named as _layer, settle_live
from test_qa import choose, click, click_section, qa_result, shown, viewer_widget  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.usefixtures("mias_cache_dir"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:System theme detection:UserWarning"),
]


def _click_row(qtbot, table, row: int) -> None:
    item = table.item(row, 1)
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=table.visualItemRect(item).center())


def test_lesions_table_jump_match_reject_and_save(shown, qtbot, tmp_path):
    viewer, widget, image, gt = shown
    choose(widget, "ground truth", gt.name)
    click_section(qtbot, widget, "Lesions")
    panel = widget.lesions
    panel.min_voxels.value = 1  # every component of this small cut is a lesion
    settle_live(qtbot, widget)
    click(qtbot, widget, "Refresh lesions")
    assert panel.model is not None, widget.message.text()
    lesions = _layer(viewer, " lesions")
    mask = _layer(viewer, " mask")
    ids = sorted(int(i) for i in np.unique(lesions.data) if i)
    assert ids and panel.table.rowCount() >= len(ids)
    np.testing.assert_array_equal(lesions.data > 0, mask.data > 0)  # every masked voxel is in a lesion, nothing else
    assert list(lesions.features["index"])[1:] == [x.id for x in panel.model.lesions.lesions]

    # the table, largest first; each lesion matched or a false positive against the picked ground truth
    rows = [r for r in panel._rows if r["kind"] == "lesion"]
    assert [r["voxels"] for r in rows] == sorted((int((lesions.data == i).sum()) for i in ids), reverse=True)
    assert {r["match"] for r in rows} <= {"matched", "false positive"}
    assert "lesion-wise Dice" in panel.info.value
    choose(widget, "sort by", "peak score")
    peaks = [r["peak_score"] for r in panel._rows if r["kind"] == "lesion"]
    assert peaks == sorted(peaks, reverse=True)
    assert [panel.table.item(i, 0).text() for i in range(len(peaks))] == [str(r["id"]) for r in panel._rows[:len(peaks)]]

    # a row click moves the viewer to that lesion's centre slice and centres the camera on it
    last = len(peaks) - 1
    target = panel._rows[last]
    _click_row(qtbot, panel.table, last)
    world = np.asarray(image.data_to_world(target["target"]))
    axis = widget.live.session.display_axis
    assert viewer.dims.point[axis] == pytest.approx(world[axis], abs=image.scale[axis])
    shown_axes = list(viewer.dims.displayed)
    np.testing.assert_allclose(np.asarray(viewer.camera.center)[-2:], world[shown_axes], atol=1e-6)
    assert panel.selected_row() is target

    # reject it: gone from the mask layer, the lesions layer and the table; the others keep their ids
    lid = target["id"]
    voxels = int((lesions.data == lid).sum())
    before = int((mask.data > 0).sum())
    click(qtbot, widget, "Reject lesion")
    assert int((mask.data > 0).sum()) == before - voxels
    assert not (lesions.data == lid).any()
    assert lid not in [r["id"] for r in panel._rows if r["kind"] == "lesion"]
    assert "1 rejected" in panel.info.value
    # accept another one (if any is left)
    left = [r for r in panel._rows if r["kind"] == "lesion"]
    if left:
        _click_row(qtbot, panel.table, 0)
        click(qtbot, widget, "Accept lesion")
        assert panel._rows[0]["review"] == "accepted"

    # Save results: the mask and the lesion files leave the rejected lesion out; the QA table counts it
    widget.results_folder.value = tmp_path / "results"
    settle_live(qtbot, widget)
    click(qtbot, widget, "Save results")
    out = tmp_path / "results"
    assert (out / "case_01_mask.nii.gz").is_file(), widget.message.text()
    saved_mask = np.asarray(nib.load(str(out / "case_01_mask.nii.gz")).dataobj)
    saved_ids = np.asarray(nib.load(str(out / "case_01_lesions.nii.gz")).dataobj)
    assert int((saved_mask > 0).sum()) == before - voxels
    assert lid not in np.unique(saved_ids)
    with open(out / "case_01_lesions.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["id"]) for r in table] == sorted(int(i) for i in np.unique(saved_ids) if i)
    if left:
        assert "accepted" in [r["review"] for r in table]
    with open(out / "case_01_qa.csv", newline="") as fh:
        qa = list(csv.DictReader(fh))
    assert qa[0]["lesions_rejected"] == "1" and qa[0]["lesionwise_dice"] != ""
