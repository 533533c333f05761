"""Live-QA logic without a viewer: what a settings change costs, generations and stale slices,
moved points in the model frame, display-order slices, and the Dice / error-overlay helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakes import FakeBackbone
from napari_mias_sam.data.volumes import Volume
from napari_mias_sam.viewer.models.live import (
    CHANGE_MASK,
    CHANGE_NONE,
    CHANGE_PROMPT,
    CHANGE_RERUN,
    FN,
    FP,
    LiveSession,
    classify_change,
    compare_with_gt,
    error_overlay,
    ranked_slices,
)
from napari_mias_sam.pipeline.segment import EncodedVolume, SegmentationResult, decode_all
from napari_mias_sam.method.preprocess import Frame
from napari_mias_sam.pipeline.settings import SegmentSettings


def disc_backbone() -> FakeBackbone:
    """Decodes a prompt to three discs (radius 30, 15, 8 frame pixels) around its centre."""
    return FakeBackbone(name="disc", sha="none", masks="discs", radii=(30.0, 15.0, 8.0))


def _result(axis: int = 2, shape=(40, 30, 4)) -> SegmentationResult:
    """A result whose maps hold one blob per slice, at a different place on each slice."""
    n = shape[axis]
    h, w = [s for a, s in enumerate(shape) if a != axis]
    frame = Frame(h, w)
    maps = np.zeros((n, 256, 256), np.float32)
    rr, cc = np.mgrid[:256, :256]
    for s in range(n):
        maps[s] = np.exp(-((rr - 60 - 20 * s) ** 2 + (cc - 80) ** 2) / 200.0) + 0.3 * np.exp(-((rr - 150) ** 2 + (cc - 40) ** 2) / 400.0)
    enc = EncodedVolume(embeddings=torch.zeros((n, 256, 64, 64), dtype=torch.float16), frames=torch.zeros((n, 256, 256)),
                        foreground=np.ones(n, bool), axis=axis, frame=frame, key="k")
    settings = SegmentSettings(prompt="cog-point")
    bb = disc_backbone()
    prompts, logits, ious = decode_all(enc, maps, bb, settings)
    return SegmentationResult(
        volume=Volume(data=np.zeros(shape, np.float32), affine=np.eye(4)), encoded=enc, settings=settings,
        bank_info={}, backbone_info={"name": "disc"}, preprocessing={}, scores=np.zeros((n, 32, 32), np.float32),
        raw_maps=maps, maps=maps, image_scores=np.arange(n, dtype=np.float32)[::-1].copy(), decision=np.ones(n, bool),
        decision_threshold=None, prompts=prompts, logits=logits, ious=ious,
    )


def test_classify_change():
    base = SegmentSettings(prompt="cog-box")
    assert classify_change(base, base) == CHANGE_NONE
    assert classify_change(base, base.replace(mask_index=1)) == CHANGE_MASK
    assert classify_change(base, base.replace(gamma=2.0)) == CHANGE_PROMPT
    assert classify_change(base, base.replace(prompt="max-point", mask_index=2)) == CHANGE_PROMPT
    assert classify_change(base, base.replace(k=3)) == CHANGE_RERUN
    assert classify_change(base, base.replace(normalisation="reference")) == CHANGE_RERUN


def test_prompt_change_redecodes_every_slice_current_first():
    res = _result()
    bb = disc_backbone()
    ses = LiveSession(res, bb, (2, 1, 0))
    p0 = [ses.point(s) for s in range(4)]
    assert ses.change_settings(res.settings.replace(gamma=1.0)) == CHANGE_PROMPT
    assert ses.stale == {0, 1, 2, 3}
    order = ses.order_from(2)
    assert order == [2, 1, 3, 0]
    updates = list(ses.refresh_iter(order, ses.generation))
    assert [u.s for u in updates] == order and bb.decode_calls == 4 and not ses.stale
    moved = [np.linalg.norm(np.subtract(ses.point(s), p0[s])) for s in range(4)]
    assert min(moved) > 1.0  # gamma 1 pulls the CoG towards the second blob
    # Display order: the pipeline axis (file axis 2) is display axis 0.
    assert ses.display_axis == 0
    assert updates[0].mask.shape == (30, 40)
    np.testing.assert_array_equal(ses.mask_display()[ses.slice_index(2)], updates[0].mask)


def test_superseded_pass_stops_and_mask_change_needs_no_decoder():
    res = _result()
    bb = disc_backbone()
    ses = LiveSession(res, bb)
    ses.change_settings(res.settings.replace(gamma=2.0))
    old = ses.refresh_iter(ses.order_from(0), ses.generation)
    next(old)
    ses.change_settings(res.settings.replace(gamma=3.0))  # a newer change
    assert list(old) == []  # the old pass gives up
    assert ses.stale == {0, 1, 2, 3}
    list(ses.refresh_iter(ses.order_from(0), ses.generation))
    calls = bb.decode_calls
    m3 = ses.mask_display().copy()
    assert ses.change_settings(ses.settings.replace(mask_index=1)) == CHANGE_MASK
    list(ses.refresh_iter(ses.order_from(0), ses.new_generation()))
    assert bb.decode_calls == calls
    assert ses.mask_display().sum() > m3.sum()  # mask 1 is the largest disc


def test_moved_point_becomes_the_prompt_and_survives_settings_changes():
    res = _result(axis=0, shape=(3, 50, 60))
    bb = disc_backbone()
    ses = LiveSession(res, bb, (0, 1, 2))
    target = (1.0, 10.0, 45.0)  # display = file order here: slice 1, row 10, column 45
    xy = ses.move_point(1, target)
    fr = res.encoded.frame
    assert xy == pytest.approx(tuple(reversed(fr.to_frame(10.0, 45.0))))
    assert ses.stale == {1}
    list(ses.refresh_iter([1], ses.new_generation()))
    np.testing.assert_allclose(ses.point(1), target, atol=1e-6)
    ses.change_settings(ses.settings.replace(gamma=9.0))
    list(ses.refresh_iter(ses.order_from(0), ses.generation))
    np.testing.assert_allclose(ses.point(1), target, atol=1e-6)
    assert ses.metadata()["moved_points"] == {"1": [round(xy[0], 3), round(xy[1], 3)]}
    assert ses.reset_points() == [1]
    list(ses.refresh_iter([1], ses.new_generation()))
    assert np.linalg.norm(np.subtract(ses.point(1), target)) > 1.0


def test_compare_with_gt_and_error_overlay():
    pred = np.zeros((4, 5, 6), bool)
    gt = np.zeros((4, 5, 6), bool)
    pred[1, 1:3, 1:3] = True
    gt[1, 2:4, 1:3] = True
    gt[3, 0, 0] = True
    r = compare_with_gt(pred, gt, axis=0, s=1)
    assert r["slice_dice"] == pytest.approx(2 * 2 / (4 + 4))
    assert r["volume_dice"] == pytest.approx(2 * 2 / (4 + 5))
    assert r["mean_slice_dice"] == pytest.approx((0.5 + 0.0) / 2) and r["lesion_slices"] == 2
    assert np.isnan(compare_with_gt(pred, gt, axis=0, s=0)["slice_dice"])
    ov = error_overlay(pred, gt)
    assert (ov == FP).sum() == 2 and (ov == FN).sum() == 3
    with pytest.raises(ValueError):
        compare_with_gt(pred, gt[:3], axis=0, s=0)


def test_box_prompts_as_display_rectangles_and_mask_counts():
    """Each box prompt becomes a (4, 3) display-order rectangle on its slice whose centre is the
    prompt centre; a moved point's box is of kind 'moved'; counts of kept and dropped masks."""
    res = _result(axis=2, shape=(40, 30, 4))
    bb = disc_backbone()
    ses = LiveSession(res, bb, (2, 0, 1))
    ses.change_settings(res.settings.replace(prompt="cog-box"))
    list(ses.refresh_iter(ses.order_from(0), ses.generation))
    shapes, feats = ses.prompt_shapes()
    assert len(shapes) == 4 and list(feats["slice"]) == [0, 1, 2, 3] and set(feats["kind"]) == {"cog-box"}
    for s, rect in zip(feats["slice"], shapes):
        assert rect.shape == (4, 3) and np.allclose(rect[:, ses.display_axis], s)
        np.testing.assert_allclose(rect.mean(axis=0), ses.point(s), atol=1e-6)
        x0, y0, x1, y1 = res.prompts[s].box  # the box's extent, mapped back to the slice grid
        fr = res.encoded.frame
        assert np.ptp(rect[:, 1]) == pytest.approx((y1 - y0) / fr.scale) and np.ptp(rect[:, 2]) == pytest.approx((x1 - x0) / fr.scale)
    ses.move_point(2, (2.0, 20.0, 15.0))
    list(ses.refresh_iter([2], ses.new_generation()))
    shapes, feats = ses.prompt_shapes()
    assert list(feats["kind"]) == ["cog-box", "cog-box", "moved", "cog-box"]
    np.testing.assert_allclose(shapes[2].mean(axis=0), (2.0, 20.0, 15.0), atol=1e-6)
    # A point prompt has no box.
    ses.change_settings(ses.settings.replace(prompt="cog-point"))
    list(ses.refresh_iter(ses.order_from(0), ses.generation))
    assert ses.prompt_shapes()[0] == []
    c = ses.mask_counts()
    assert c == {"slices": 4, "anatomy": 4, "prompted": 4, "dropped": 0, "kept": 4}
    res.decision[1] = False
    assert ses.mask_counts()["dropped"] == 1 and ses.mask_counts()["kept"] == 3


def test_moved_points_carried_to_a_new_session_are_decoded_with_it():
    res = _result(axis=0, shape=(3, 50, 60))
    ses = LiveSession(res, disc_backbone(), (0, 1, 2))
    xy = ses.move_point(1, (1.0, 10.0, 45.0))
    again = LiveSession(_result(axis=0, shape=(3, 50, 60)), disc_backbone(), (0, 1, 2), overrides=ses.overrides)
    assert again.overrides == {1: xy} and again.stale == {1}
    list(again.refresh_iter(sorted(again.stale), again.generation))
    np.testing.assert_allclose(again.point(1), (1.0, 10.0, 45.0), atol=1e-6)
    assert again.points()[1]["moved"].tolist() == [False, True, False]
    # Out-of-range slices (another volume's) are not carried.
    assert LiveSession(_result(axis=0, shape=(3, 50, 60)), disc_backbone(), overrides={7: (1.0, 2.0)}).overrides == {}


def test_ranked_slices():
    assert ranked_slices(np.array([0.1, 0.9, 0.5, 2.0]), np.array([True, True, True, False])) == [1, 2, 0, 3]


def test_compute_and_io_modules_import_without_qt():
    """Only the ``_widget*`` modules may import Qt: the rest works in a process without it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6'):\n"
        "    sys.modules[m] = None\n"
        "import napari_mias_sam.viewer.models.live, napari_mias_sam.viewer.models.layers, napari_mias_sam.viewer.reader\n"
        "import napari_mias_sam.viewer.writer, napari_mias_sam.viewer.samples, napari_mias_sam.pipeline.segment\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def _regions_result() -> tuple[SegmentationResult, FakeBackbone]:
    """A regions-prompt result: two anomalous pieces on slice 1 (a high one and a lower one), one
    on slice 0 where no decoder mask agrees (the discs are far too small), none on slice 2."""
    from napari_mias_sam.method.regions import NormalLevels, anomalous_regions, region_cores

    n, rr, cc = 3, *np.mgrid[:256, :256]
    maps = np.zeros((n, 256, 256), np.float32)
    maps[1] = 2.0 * ((rr - 60) ** 2 + (cc - 60) ** 2 <= 25 ** 2) + 1.6 * ((rr - 180) ** 2 + (cc - 190) ** 2 <= 25 ** 2)
    maps[0] = 1.5 * ((rr - 128) ** 2 + (cc - 128) ** 2 <= 90 ** 2)
    levels = NormalLevels(seed=1.2, extent=0.8, extent_quantile=50.0)
    regions = anomalous_regions(maps, levels, three_d=False)
    cores = region_cores(maps, regions, levels)
    enc = EncodedVolume(embeddings=torch.zeros((n, 256, 64, 64)), frames=torch.zeros((n, 256, 256)),
                        foreground=np.ones(n, bool), axis=2, frame=Frame(256, 256), key="k")
    settings = SegmentSettings(prompt="regions", mask_index=1)
    bb = FakeBackbone(name="disc", sha="none", masks="discs", radii=(22.0, 12.0, 6.0))
    details: list = []
    prompts, logits, ious = decode_all(enc, maps, bb, settings, regions=regions, cores=cores, details=details)
    res = SegmentationResult(
        volume=Volume(data=np.zeros((256, 256, n), np.float32), affine=np.eye(4)), encoded=enc, settings=settings,
        bank_info={}, backbone_info={"name": "disc"}, preprocessing={}, scores=np.zeros((n, 32, 32), np.float32),
        raw_maps=maps, maps=maps, image_scores=np.zeros(n, np.float32), decision=np.array([True, True, False]),
        decision_threshold=None, prompts=prompts, logits=logits, ious=ious, regions=regions, region_cores=cores,
        region_levels=levels, region_decodes=details)
    return res, bb


def test_the_cog_layer_holds_every_prompt_sent_and_the_mask_rule():
    """Regions prompt: one CoG point per region piece, each exactly where its prompt was sent;
    the mask each kept (or the region where none agreed) is in the points' features and the
    dock's text; a slice without a region has no point and no mask."""
    res, bb = _regions_result()
    ses = LiveSession(res, bb, (0, 1, 2))
    coords, feats = ses.points()
    sent = [(s, p) for s in range(3) for p in (res.prompts[s].centres() if res.prompts[s] else [])]
    assert len(coords) == len(sent) == 3 and feats["slice"].tolist() == [0, 1, 1] and feats["piece"].tolist() == [0, 0, 1]
    for (s, (x, y)), c in zip(sent, coords):  # display order = file order here: (row, col, slice)
        assert tuple(c) == pytest.approx((y, x, s))
    assert feats["mask_used"].tolist() == ["region", "1", "1"]
    assert "region (no mask agreed with the map)" in ses.mask_rule_text(0)
    assert ses.mask_rule_text(1).startswith("mask 1 (agreement") and ses.mask_rule_text(2) == ""
    assert res.prompts[2] is None and not res.slice_mask(2).any()
    # gamma moves the points of the session after re-decoding, and each point is still the prompt sent
    before = coords.copy()
    ses.change_settings(res.settings.replace(gamma=1.0))
    list(ses.refresh_iter(ses.order_from(1), ses.generation))
    after, _ = ses.points()
    assert after.shape == before.shape
    for s in range(2):
        assert [ses.file_to_display(v) for v in res.prompt_centres(s)] == ses.slice_points(s)
