"""The viewer as a researcher uses it, driven through the real controls (found by their visible
text) in a real napari viewer with the real LiteMedSAM: the prompt boxes, moved points kept across
reruns, the layer order and selection, messages that stay, the dock's sections and profile, and
reruns that reuse the anomaly maps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt
from qtpy.QtWidgets import QCheckBox, QComboBox, QLabel, QPushButton, QRadioButton, QScrollArea, QSlider

from conftest import layer_named as _layer, settle_live as _settle, wait_until
from napari_mias_sam.pipeline.embedding_cache import EmbeddingCache
from napari_mias_sam.data.volumes import load_volume
from napari_mias_sam.pipeline.segment import segment_volume
from napari_mias_sam.pipeline.settings import SegmentSettings

PLUGIN = "napari-mias-sam"
pytestmark = [
    pytest.mark.usefixtures("mias_cache_dir"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:System theme detection:UserWarning"),
]


# -- finding and using the controls a user sees ----------------------------------------------------
def _buttons(widget, text: str, kind=QPushButton) -> list:
    return [b for b in widget.findChildren(kind) if b.text().strip() == text and b.isVisibleTo(widget)]


def click(qtbot, widget, text: str, kind=QPushButton) -> None:
    """Click the visible button (or check box, or section title) showing ``text``."""
    (button,) = _buttons(widget, text, kind)
    assert button.isEnabled(), f"'{text}' is disabled"
    # A section just unfolded animates its height from 0: click once the button is laid out whole
    # (a click on a 0-pixel-high button is outside it and does nothing).
    qtbot.waitUntil(lambda: button.height() >= button.minimumSizeHint().height(), timeout=5000)
    # A check box or radio button toggles when its indicator (at the left) is clicked.
    pos = button.rect().center() if kind is QPushButton else QPoint(8, button.height() // 2)
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton, pos=pos)


def control(widget, label: str, kind):
    """The control of type ``kind`` beside the visible label ``label`` (magicgui's label + widget rows)."""
    for lab in widget.findChildren(QLabel):
        if lab.text() == label and lab.isVisibleTo(widget):
            found = lab.parentWidget().findChildren(kind)
            if found:
                return found[0]
    raise LookupError(f"no {kind.__name__} labelled {label!r}")


def choose(widget, label: str, text: str) -> None:
    """Pick ``text`` in the drop-down labelled ``label`` as a user does (activating the item)."""
    combo = control(widget, label, QComboBox)
    i = combo.findText(text)
    assert i >= 0, f"{text!r} is not offered in {label!r}: {[combo.itemText(j) for j in range(combo.count())]}"
    combo.setCurrentIndex(i)


def section(widget, title: str):
    """The collapsible section whose title starts with ``title`` (a folded bank section adds a summary)."""
    (sec,) = [s for s in widget.sections.values() if s.text().startswith(title)]
    return sec


def click_section(qtbot, widget, title: str) -> None:
    """Click a section's title bar (found by its visible text) to fold or unfold it."""
    button = section(widget, title).toggleButton()
    assert button.text().startswith(title) and button.isVisible()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _box_centres(boxes) -> np.ndarray:
    return np.asarray([np.asarray(d).mean(axis=0) for d in boxes.data]).reshape(-1, 3)


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qa_result(sample_subset, sample_bank, lite_backbone):
    """The per-slice prompt (one box and one CoG point per prompted slice), which these QA tests are
    about. With this 6-slice bank the volumes' default is the regions prompt (a small bank's pixel
    levels), whose several pieces per slice are pinned by
    test_live_mask_equals_the_pipelines_after_a_gamma_change_and_a_drag and tests/viewer/test_widget.py."""
    return segment_volume(load_volume(sample_subset["case"]), sample_bank, lite_backbone, SegmentSettings(prompt="cog-box"),
                          cache=EmbeddingCache())


@pytest.fixture
def viewer_widget(make_napari_viewer, sample_subset, sample_bank, lite_backbone):
    """The case and its ground truth opened by the plugin's reader, the widget docked through the
    plugin's menu entry, holding the session's LiteMedSAM and bank."""
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1920, 1020)  # a 1080p screen less a taskbar and the window's title bar
    (image,) = viewer.open(str(sample_subset["case"]), plugin=PLUGIN)
    (gt,) = viewer.open(str(sample_subset["gt"]), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "MIAS-SAM")
    widget.use_backbone(lite_backbone, device="cpu")
    widget.image.value = image
    return viewer, widget, image, gt


@pytest.fixture
def shown(viewer_widget, sample_bank, qa_result, lite_backbone):
    viewer, widget, image, gt = viewer_widget
    widget.set_bank(sample_bank)
    widget.show_result(copy.deepcopy(qa_result), image, lite_backbone)
    return viewer_widget


# -- 1. the prompt is visible; moved points are kept -----------------------------------------------------
def test_prompt_boxes_follow_gamma_and_moved_points_survive_a_rerun(shown, qtbot, sample_bank, monkeypatch):
    viewer, widget, image, gt = shown
    boxes, points = _layer(viewer, " prompt box"), _layer(viewer, " CoG")
    assert type(boxes).__name__ == "Shapes"
    ses = widget.live.session
    ax = ses.display_axis
    # One rectangle per prompted slice, on its slice, kind in the features, centred on the CoG point.
    assert len(boxes.data) == len(points.data) == 3
    assert list(boxes.shape_type) == ["rectangle"] * 3
    assert list(boxes.features["kind"]) == ["cog-box"] * 3
    for rect, s in zip(boxes.data, boxes.features["slice"]):
        assert np.allclose(np.asarray(rect)[:, ax], s)
    np.testing.assert_allclose(_box_centres(boxes), points.data, atol=1e-6)
    sizes = np.ptp(np.asarray(boxes.data), axis=1).copy()

    # Gamma through the real slider: the boxes are re-drawn with the new prompts.
    slider = control(widget, "gamma", QSlider)
    slider.setValue(slider.minimum())  # gamma 0.5: a wide, flat weighting -> larger boxes
    _settle(qtbot, widget)
    assert widget.gamma.value == 0.5
    new_sizes = np.ptp(np.asarray(boxes.data), axis=1)
    assert (new_sizes.sum(axis=1) > sizes.sum(axis=1) + 1).all(), (sizes, new_sizes)
    np.testing.assert_allclose(_box_centres(boxes), points.data, atol=1e-6)

    # Drag a point: it turns orange at once, its box follows as kind "moved".
    row = 1
    s = int(points.features["slice"][row])
    data = points.data.copy()
    inplane = [a for a in range(3) if a != ax]
    data[row, inplane[0]] += 12.0
    points.data = data
    np.testing.assert_allclose(points.face_color[row], [1.0, 165 / 255, 0.0, 1.0], atol=1e-3)  # orange
    np.testing.assert_allclose(points.face_color[0], [1.0, 0.0, 0.0, 1.0])  # the others stay red
    _settle(qtbot, widget)
    kinds = dict(zip(boxes.features["slice"], boxes.features["kind"]))
    assert kinds[s] == "moved" and sorted(kinds.values()).count("moved") == 1
    np.testing.assert_allclose(_box_centres(boxes)[list(boxes.features["slice"]).index(s)], data[row], atol=0.6)
    assert "; 1 moved point" in widget.counts_info.value

    # A rerun (the real button) keeps the moved point and reuses the anomaly maps (no kNN search).
    searches = []
    search = sample_bank.search
    monkeypatch.setattr(sample_bank, "search", lambda *a, **k: (searches.append(1), search(*a, **k))[1])
    click(qtbot, widget, "Run MIAS-SAM")
    wait_until(qtbot, lambda: widget.job.done, timeout=300)
    _settle(qtbot, widget)
    assert widget.live.session.result.maps_reused and not searches
    assert "anomaly maps reused" in widget.status.value and "1 moved point kept" in widget.status.value
    points, boxes = _layer(viewer, " CoG"), _layer(viewer, " prompt box")
    np.testing.assert_allclose(points.data[row], data[row], atol=1e-3)
    assert bool(points.features["moved"][row]) and dict(zip(boxes.features["slice"], boxes.features["kind"]))[s] == "moved"
    assert str(s) in points.metadata["mias_sam"]["moved_points"]

    # Setting changes keep it too; "Reset moved points" drops it.
    click(qtbot, widget, "2", kind=QRadioButton)
    assert widget.mask.value == 2
    _settle(qtbot, widget)
    np.testing.assert_allclose(points.data[row], data[row], atol=1e-3)
    click(qtbot, widget, "Reset moved points")
    _settle(qtbot, widget)
    assert not points.features["moved"].any()
    np.testing.assert_allclose(points.face_color, np.tile([1.0, 0.0, 0.0, 1.0], (len(points.data), 1)))
    assert "moved" not in set(boxes.features["kind"])
    assert np.linalg.norm(points.data[row] - data[row]) > 1.0


# -- 2. layer order and selection -------------------------------------------------------------------------
def test_layer_order_selection_and_outlines_serve_qa(shown, qtbot):
    viewer, widget, image, gt = shown
    names = [lay.name for lay in viewer.layers]
    assert names[-4:] == ["case_01 anomaly", "case_01 mask", "case_01 prompt box", "case_01 CoG"]
    assert viewer.layers.selection.active is _layer(viewer, " CoG")
    # The ground truth, picked in the dock: an outline over the mask, under the prompts.
    choose(widget, "ground truth", gt.name)
    assert widget.gt.value is gt
    assert gt.contour > 0
    names = [lay.name for lay in viewer.layers]
    assert names.index(gt.name) > names.index("case_01 mask") and names.index(gt.name) < names.index("case_01 prompt box")
    # FP/FN outlines from the check box: under the prompts, and the points stay active.
    click(qtbot, widget, "show false positives (yellow) / negatives (magenta)", kind=QCheckBox)
    errs = _layer(viewer, " FP/FN")
    assert errs.contour > 0
    names = [lay.name for lay in viewer.layers]
    assert names[-3:] == ["case_01 FP/FN", "case_01 prompt box", "case_01 CoG"]
    assert viewer.layers.selection.active is _layer(viewer, " CoG")
    assert max(len(n) for n in names) <= 24  # every name fits the layer list
    click(qtbot, widget, "show false positives (yellow) / negatives (magenta)", kind=QCheckBox)
    assert not [lay for lay in viewer.layers if lay.name.endswith("FP/FN")]


# -- 3. messages that stay -----------------------------------------------------------------------------------
def test_messages_stay_in_the_dock(viewer_widget, qtbot, sample_bank):
    viewer, widget, image, gt = viewer_widget
    # Run without a bank: the full text stays in the dock.
    click(qtbot, widget, "Run MIAS-SAM")
    assert widget.message.isVisible() and widget.message.level == "error"
    assert "no memory bank: build one from normal volumes" in widget.message.text()
    assert widget.message.text().rstrip().endswith("first.")
    qtbot.wait(500)
    assert "no memory bank" in widget.message.text()  # still there
    # A point prompt on the box-only LiteMedSAM: a note where the prompt is chosen, and item tooltips.
    choose(widget, "prompt", "cog-point")
    assert widget.prompt_note.visible and "box prompts only" in widget.prompt_note.value
    combo = control(widget, "prompt", QComboBox)
    assert "Not for litemedsam" in combo.itemData(combo.findText("cog-point"), Qt.ItemDataRole.ToolTipRole)
    assert "Not for" not in combo.itemData(combo.findText("cog-box"), Qt.ItemDataRole.ToolTipRole)
    # With a bank the run works; the note survives the run and its live updates; the error is gone.
    widget.set_bank(sample_bank)
    click(qtbot, widget, "Run MIAS-SAM")
    wait_until(qtbot, lambda: widget.job.done, timeout=300)
    _settle(qtbot, widget)
    assert widget.live.session.settings.prompt == "cog-point"
    assert widget.prompt_note.visible and "box prompts only" in widget.prompt_note.value
    assert widget.message.level != "error"
    # How many slices kept a mask, matching the mask layer.
    mask = _layer(viewer, " mask")
    ses = widget.live.session
    kept = sum(bool(mask.data[ses.slice_index(s)].any()) for s in range(ses.n_slices))
    assert f"{kept} of 3 prompted slices kept a mask" in widget.counts_info.value
    # LiteMedSAM's IoU head does not track quality: no IoU figures, and the dock says why.
    assert "mask 1:" not in widget.iou_info.value and "does not track" in widget.iou_info.value
    assert "does not track" in widget.mask.tooltip
    # Back to cog-box: the note goes.
    choose(widget, "prompt", "cog-box")
    assert not widget.prompt_note.visible


# -- 4. a dock that fits a 1080p screen ---------------------------------------------------------------------
def test_dock_fits_1080p_with_the_qa_in_view(shown, qtbot, sample_subset):
    viewer, widget, image, gt = shown
    qtbot.wait(200)
    assert not section(widget, "Memory bank").isExpanded()  # folded once a bank is in use, with a summary
    assert section(widget, "Memory bank").text().startswith("Memory bank: 6,144 patches, litemedsam")
    for title in ("Model", "Run", "Compare with ground truth"):
        assert section(widget, title).isExpanded()
    # Scrolled to the top, the profile and "Next most anomalous slice" are in view, uncut.
    scroll = widget.findChild(QScrollArea)
    scroll.verticalScrollBar().setValue(0)
    qtbot.wait(100)
    view = scroll.viewport()
    for w in (widget.profile, widget.next_btn.native):
        top = w.mapTo(view, w.rect().topLeft()).y()
        assert 0 <= top and top + w.height() <= view.height(), (type(w).__name__, top, w.height(), view.height())
    # Nothing widens the dock past its width (a bank named by its content hash once cut every row).
    long_summary = "43,008 patches, litemedsam (sample-litemedsam-0123456789abcdef0123)"
    widget.fold_bank_section(long_summary)
    qtbot.wait(100)
    assert section(widget, "Memory bank").text().endswith("…") and long_summary in section(widget, "Memory bank").toolTip()
    assert scroll.widget().minimumSizeHint().width() <= view.width(), (scroll.widget().minimumSizeHint().width(), view.width())
    # Sections fold and unfold from their title.
    click_section(qtbot, widget, "Memory bank")
    assert section(widget, "Memory bank").isExpanded()
    qtbot.wait(200)  # laid out for the first time (it was folded before the dock was shown)
    # The normal volumes are listed by name.
    click(qtbot, widget, "Use sample normals")
    text = widget.normals_info.value
    assert text.startswith("3 files: normal_01.nii.gz, normal_02.nii.gz, normal_03.nii.gz in ")
    # The sliders are named by anatomy.
    assert tuple(viewer.dims.axis_labels) == ("axial", "coronal", "sagittal")


def test_profile_has_slice_numbers_gt_ticks_and_greys_dropped_slices(shown, qtbot, sample_subset):
    from napari_mias_sam.viewer.widget_profile import DROPPED, KEPT, tick_slices

    viewer, widget, image, gt = shown
    assert tick_slices(155, 400) == list(range(0, 155, 20))
    assert tick_slices(3, 400) == [0, 1, 2]
    # The slice decision on (the real check box) and a rerun: dropped slices are grey in the profile.
    click(qtbot, widget, "keep masks only on slices scored anomalous", kind=QCheckBox)
    wait_until(qtbot, lambda: widget.message.level == "warning", timeout=5)
    assert "Run MIAS-SAM again" in widget.message.text()
    click(qtbot, widget, "Run MIAS-SAM")
    wait_until(qtbot, lambda: widget.job.done, timeout=300)
    _settle(qtbot, widget)
    res = widget.live.session.result
    assert widget.message.level != "warning"
    dropped = res.encoded.foreground & ~res.decision
    assert res.settings.slice_decision and res.maps_reused  # k unchanged: the same maps, only the decision is new
    for s in range(res.n_slices):
        assert widget.profile.bar_color(s) == (DROPPED if dropped[s] else KEPT)
    widget.profile.set_data([1.0, 3.0, 2.0], dropped=[True, False, False])
    assert [widget.profile.bar_color(s) for s in range(3)] == [DROPPED, KEPT, KEPT]
    widget.profile.set_data(res.image_scores, res.encoded.foreground, res.decision_threshold, dropped=dropped)
    if dropped.any():
        assert f"the slice decision dropped {int(dropped.sum())}" in widget.counts_info.value
    else:
        assert "dropped" not in widget.counts_info.value
    choose(widget, "ground truth", gt.name)
    lesion = widget.profile.lesion
    assert lesion is not None and list(np.flatnonzero(lesion)) == sample_subset["lesion_slices"]
    img = widget.profile.grab().toImage()
    assert img.width() > 0  # paints without error with the axis, ticks and greys


# -- 6. what the dock shows is what the pipeline computes ---------------------------------------------------
def _show_regions_result(viewer_widget, sample_subset, sample_bank, lite_backbone):
    """The dock showing ``segment_volume``'s regions result (mask 1) of the sample case:
    (viewer, widget, volume, settings)."""
    viewer, widget, image, _gt = viewer_widget
    volume = load_volume(sample_subset["case"])
    settings = SegmentSettings(prompt="regions", mask_index=1)
    widget.set_bank(sample_bank)
    widget.show_result(segment_volume(volume, sample_bank, lite_backbone, settings, cache=EmbeddingCache()), image,
                       lite_backbone)
    return viewer, widget, volume, settings


def test_live_mask_equals_the_pipelines_after_a_gamma_change_and_a_drag(viewer_widget, qtbot, sample_subset, sample_bank,
                                                                        lite_backbone):
    """The regions prompt (several region pieces per slice, decoded together): after a gamma change,
    the dock's mask layer equals ``segment_volume``'s with the same settings,
    voxel for voxel; after a CoG point is dragged, the slice equals ``redecode_slice`` with that
    point (the pipeline's function for a moved prompt) on the plain backbone."""
    from napari_mias_sam.pipeline.segment import redecode_slice
    from napari_mias_sam.viewer.models.layers import to_display

    viewer, widget, volume, settings = _show_regions_result(viewer_widget, sample_subset, sample_bank, lite_backbone)
    ses, mask = widget.live.session, _layer(viewer, " mask")
    assert max(len(ses.slice_points(s)) for s in range(ses.n_slices)) >= 2  # a slice with several pieces

    widget.gamma.value = 2.0  # as the slider sets it
    _settle(qtbot, widget)
    assert ses.settings.gamma == 2.0
    ref = segment_volume(volume, sample_bank, lite_backbone, settings.replace(gamma=2.0), cache=EmbeddingCache())
    np.testing.assert_array_equal(mask.data, to_display(ref.mask_volume(1), ses.axes))
    np.testing.assert_array_equal(ses.result.logits, ref.logits)

    points = _layer(viewer, " CoG")
    row = int(np.argmax([len(ses.slice_points(int(s))) for s in points.features["slice"]]))  # a slice with pieces
    s, piece = int(points.features["slice"][row]), int(points.features["piece"][row])
    data = points.data.copy()
    data[row, [a for a in range(3) if a != ses.display_axis][0]] += 6.0
    points.data = data  # a drag ends with this change
    _settle(qtbot, widget)
    assert ses.moved_piece[s] == piece
    moved = redecode_slice(ref, lite_backbone, s, settings=ses.settings, point=ses.overrides[s], piece=piece)
    ref.apply(moved)
    np.testing.assert_array_equal(mask.data, to_display(ref.mask_volume(1), ses.axes))
    assert ses.result.prompts[s] == moved.prompt and np.array_equal(ses.result.logits[s], moved.logits)


def test_a_gamma_step_after_a_run_reads_the_prefetched_decodes(viewer_widget, qtbot, sample_subset, sample_bank,
                                                               lite_backbone, monkeypatch):
    """The prefetch on (the default; the tests turn it off): once the dock is idle after a run, the
    shown slice was decoded ahead at the next gamma values, so one slider step decodes nothing for
    that slice, and the dock's mask still equals ``segment_volume``'s at the new gamma."""
    from napari_mias_sam.viewer.models.layers import to_display

    monkeypatch.setenv("MIAS_SAM_PREFETCH", "1")
    viewer, widget, volume, settings = _show_regions_result(viewer_widget, sample_subset, sample_bank, lite_backbone)
    live = widget.live
    ses = live.session
    assert live.prefetch
    s = int(np.argmax([len(ses.slice_points(t)) for t in range(ses.n_slices)]))  # the slice with the most pieces
    live.jump_to(s)
    wait_until(qtbot, lambda: live.current_slice() == s and not live.busy and not live.prefetching)
    misses = {}
    redecode = ses.redecode

    def counted(t, generation=None):
        before = ses.decoder.misses
        out = redecode(t, generation)
        misses[int(t)] = ses.decoder.misses - before
        return out

    monkeypatch.setattr(ses, "redecode", counted)
    before = ses.result.prompts[s]
    # one slider step, as a mouse drag lands on it (magicgui's FloatSlider gave 4.500017): the dock
    # puts it back on the grid the prefetch was made on
    widget.gamma.value = ses.settings.gamma + 0.5 + 1.7e-5
    _settle(qtbot, widget)
    assert ses.settings.gamma == settings.gamma + 0.5
    assert ses.result.prompts[s] != before  # gamma moved the slice's prompts...
    assert misses[s] == 0 and len(misses) == ses.n_slices  # ...and they came from the cache; the others decoded
    ref = segment_volume(volume, sample_bank, lite_backbone, settings.replace(gamma=settings.gamma + 0.5),
                         cache=EmbeddingCache())
    np.testing.assert_array_equal(_layer(viewer, " mask").data, to_display(ref.mask_volume(1), ses.axes))
    np.testing.assert_array_equal(ses.result.logits, ref.logits)
    # idle again: the new gamma's neighbours are prefetched in turn (one step down is the old gamma)
    wait_until(qtbot, lambda: not live.busy and not live.prefetching)
