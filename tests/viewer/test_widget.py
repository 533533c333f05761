"""The MIAS-SAM dock widget in a real viewer with the real LiteMedSAM backbone on a cut of the
bundled sample: a run end to end (with the event loop's latency measured while it works), live
gamma / mask / moved-point updates, Dice against the ground truth, cancel, and user errors."""

from __future__ import annotations

import copy
import time

import nibabel as nib
import numpy as np
import pytest

from conftest import LoopLatency, layer_named as _layer, settle_live as _settle, wait_until
from napari_mias_sam.pipeline.embedding_cache import EmbeddingCache
from napari_mias_sam.data.volumes import load_volume
from napari_mias_sam.pipeline.segment import segment_volume
from napari_mias_sam.pipeline.settings import SegmentSettings

PLUGIN = "napari-mias-sam"
pytestmark = [
    pytest.mark.usefixtures("mias_cache_dir"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:System theme detection:UserWarning"),
]


@pytest.fixture(scope="session")
def sample_result(sample_subset, sample_bank, lite_backbone):
    """The pipeline's result on the cut sample case (default settings: with this 6-slice bank, the
    regions prompt on a small bank's pixel levels, gamma 5, mask 1)."""
    return segment_volume(load_volume(sample_subset["case"]), sample_bank, lite_backbone, SegmentSettings(),
                          cache=EmbeddingCache())


@pytest.fixture
def errors(monkeypatch):
    """Messages the widget shows with napari's show_error (instead of raising)."""
    shown: list[str] = []
    import napari_mias_sam.viewer.widget as w

    monkeypatch.setattr(w, "show_error", shown.append)
    return shown


@pytest.fixture
def setup(make_napari_viewer, sample_subset, sample_bank, lite_backbone):
    """A viewer with the case and its ground truth opened by the plugin's reader, and the docked
    widget holding the session's LiteMedSAM and bank."""
    from napari_mias_sam.viewer.widget import MiasSamWidget

    viewer = make_napari_viewer()
    (image,) = viewer.open(str(sample_subset["case"]), plugin=PLUGIN)
    (gt,) = viewer.open(str(sample_subset["gt"]), plugin=PLUGIN)
    widget = MiasSamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MIAS-SAM")
    widget.use_backbone(lite_backbone, device="cpu")
    widget.set_bank(sample_bank)
    widget.image.value = image
    return viewer, widget, image, gt


@pytest.fixture
def shown(setup, sample_result, lite_backbone):
    """``setup`` with a copy of the session's result shown (live edits change results in place)."""
    viewer, widget, image, gt = setup
    widget.show_result(copy.deepcopy(sample_result), image, lite_backbone)
    return setup


@pytest.fixture
def count_calls(monkeypatch, lite_backbone):
    """Counts the backbone's encoder and decoder calls."""
    calls = {"encode": 0, "decode": 0}
    enc, dec = lite_backbone.encode, lite_backbone.decode

    def encode(*a, **k):
        calls["encode"] += 1
        return enc(*a, **k)

    def decode(*a, **k):
        calls["decode"] += 1
        return dec(*a, **k)

    monkeypatch.setattr(lite_backbone, "encode", encode)
    monkeypatch.setattr(lite_backbone, "decode", decode)
    monkeypatch.setattr(lite_backbone, "decode_many", lambda emb, prompts: [decode(emb, p) for p in prompts])
    return calls


def _dice(a, b):
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    n = a.sum() + b.sum()
    return float("nan") if n == 0 else 2.0 * (a & b).sum() / n


# -- end to end -----------------------------------------------------------------------------------
def test_run_end_to_end_with_litemedsam(setup, qtbot, sample_subset, tmp_path, capsys):
    viewer, widget, image, gt = setup
    EmbeddingCache().clear()  # encode for real: this run is where the viewer's latency is measured
    returned_at = []
    run_done = widget._run_done
    widget._run_done = lambda *a: (returned_at.append(time.perf_counter()), run_done(*a))
    with LoopLatency(50) as lat:
        job = widget.run()
        assert job is not None
        wait_until(qtbot, lambda: job.done, timeout=300)
        qtbot.wait(300)
    working = lat.max_gap_between(-np.inf, returned_at[0])  # while the worker computes
    adding = lat.max_gap_between(returned_at[0], np.inf)  # the GUI thread adds the output layers
    with capsys.disabled():
        print(f"\n[event loop latency] {lat.n_ticks} ticks of 50 ms; longest gap while the worker ran: "
              f"{working * 1000:.0f} ms; while the output layers were added at the end: {adding * 1000:.0f} ms")
    assert lat.n_ticks > 10
    # Work on the GUI thread would freeze it for the whole encode (tens of seconds); 54 ms is typical on a
    # quiet 2-core machine, 0.86 s was seen with the load average at 17, hence the margin.
    assert working < 2.0, f"the viewer froze for {working:.2f} s while the worker ran"
    assert adding < 3.0

    anomaly, points, mask = _layer(viewer, " anomaly"), _layer(viewer, " CoG"), _layer(viewer, " mask")
    assert (type(anomaly).__name__, type(points).__name__, type(mask).__name__) == ("Image", "Points", "Labels")
    assert anomaly.colormap.name == "inferno" and str(anomaly.blending) == "additive"
    for layer in (anomaly, points, mask):  # aligned with the source layer
        np.testing.assert_allclose(layer.affine.affine_matrix, image.affine.affine_matrix)
    assert anomaly.data.shape == mask.data.shape == image.data.shape
    result = widget.live.session.result
    assert not result.encoded.from_cache
    # The volumes' default with this small bank (6 held-out slices: its pixel levels) is the regions
    # prompt: one red point per region piece (the prompt sent), on its slice; each prompted slice has one.
    ses = widget.live.session
    n_prompted = sum(p is not None for p in result.prompts)
    assert n_prompted == 3 and len(points.data) >= n_prompted
    assert sorted(set(points.features["slice"].astype(int))) == [s for s, p in enumerate(result.prompts) if p is not None]
    assert len(points.data) == sum(len(ses.slice_points(s)) for s in range(ses.n_slices))
    np.testing.assert_allclose(points.face_color, np.tile([1.0, 0.0, 0.0, 1.0], (len(points.data), 1)))
    ax = ses.display_axis
    np.testing.assert_array_equal(points.data[:, ax], points.features["slice"].to_numpy())
    # Metadata records every setting and the provenance, plus the source geometry.
    for layer in (anomaly, points, mask):
        md = layer.metadata["mias_sam"]
        assert md["settings"] == {**md["settings"], "gamma": 5.0, "mask_index": 1, "prompt": "regions", "k": 1,
                                  "normalisation": "calibrated"}
        assert md["backbone"]["name"] == "litemedsam" and md["bank"]["patches"] == widget.bank.ntotal
        assert md["preprocessing"]["mode"] == "mri"
        np.testing.assert_allclose(layer.metadata["affine"], image.metadata["affine"])
    # The mask saved by the plugin's writer lies on the source file's grid.
    (written,) = mask.save(str(tmp_path / "case_01_mask.nii.gz"), plugin=PLUGIN)
    back, src = nib.load(written), nib.load(str(sample_subset["case"]))
    np.testing.assert_allclose(back.affine, src.affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), result.mask_volume())
    # Running again on the same volume reads the embeddings from the cache.
    job = widget.run()
    wait_until(qtbot, lambda: job.done, timeout=300)
    assert widget.live.session.result.encoded.from_cache
    assert len([lay for lay in viewer.layers if lay.name.endswith(" mask")]) == 1  # replaced, not added


# -- live QA --------------------------------------------------------------------------------------
def test_gamma_change_moves_the_cog(shown, qtbot, count_calls):
    viewer, widget, image, gt = shown
    points = _layer(viewer, " CoG")
    before = points.data.copy()
    current = widget.live.current_slice()
    widget.gamma.value = 1.0
    _settle(qtbot, widget)
    after = points.data
    assert after.shape == before.shape
    shift = np.linalg.norm(after - before, axis=1)
    assert shift.max() > 1.0, shift  # the prompt centres moved
    assert widget.live.updated[0] == current  # the current slice first, the rest in the background
    assert sorted(widget.live.updated) == list(range(widget.live.session.n_slices))
    assert count_calls["encode"] == 0 and count_calls["decode"] == len(before)  # decoder only
    assert points.metadata["mias_sam"]["settings"]["gamma"] == 1.0
    np.testing.assert_allclose(after, widget.live.session.points()[0])


def test_mask_change_changes_the_mask(shown, qtbot, count_calls):
    viewer, widget, image, gt = shown
    mask = _layer(viewer, " mask")
    before = mask.data.copy()
    other = 3 if widget.live.session.settings.mask_index == 1 else 1  # the volumes' default (regions) uses mask 1
    widget.mask.value = other
    _settle(qtbot, widget)
    assert (mask.data != before).any()
    ses = widget.live.session
    np.testing.assert_array_equal(mask.data, ses.mask_display())
    np.testing.assert_array_equal(np.transpose(mask.data, np.argsort(ses.axes)), ses.result.mask_volume(other))
    assert count_calls["decode"] == 0 and count_calls["encode"] == 0  # cached logits only
    assert mask.metadata["mias_sam"]["settings"]["mask_index"] == other
    # LiteMedSAM's IoU head does not track quality: the readout says so instead of showing figures.
    assert f"mask {other}:" not in widget.iou_info.value and "does not track mask quality" in widget.iou_info.value


def test_moving_a_point_redecodes_that_slice(shown, qtbot, count_calls):
    viewer, widget, image, gt = shown
    points, mask = _layer(viewer, " CoG"), _layer(viewer, " mask")
    ses = widget.live.session
    before = mask.data.copy()
    row = 1
    s = int(points.features["slice"][row])
    data = points.data.copy()
    inplane = [a for a in range(3) if a != ses.display_axis]
    data[row, inplane[0]] += 25.0  # drag the CoG 25 voxels towards posterior
    prompts = len(ses.slice_points(s))  # the regions prompt: one per region piece of that slice
    points.data = data
    _settle(qtbot, widget)
    assert count_calls["decode"] == prompts  # that slice only, each of its prompts once
    idx = ses.slice_index(s)
    assert (mask.data[idx] != before[idx]).any()
    others = [t for t in range(ses.n_slices) if t != s]
    for t in others:
        np.testing.assert_array_equal(mask.data[ses.slice_index(t)], before[ses.slice_index(t)])
    np.testing.assert_allclose(points.data[row], data[row], atol=1e-3)  # the point stays where it was put
    assert str(s) in mask.metadata["mias_sam"]["moved_points"]
    # A later gamma change keeps the user's point for that slice.
    widget.gamma.value = 2.0
    _settle(qtbot, widget)
    np.testing.assert_allclose(points.data[row], data[row], atol=1e-3)
    widget.reset_points()
    _settle(qtbot, widget)
    assert mask.metadata["mias_sam"]["moved_points"] == {}


def test_dice_shown_equals_an_independent_computation(shown, qtbot):
    viewer, widget, image, gt = shown
    mask = _layer(viewer, " mask")
    widget.gt.value = gt
    ax = widget.live.session.display_axis
    for mask_index in (3, 1):
        widget.mask.value = mask_index
        _settle(qtbot, widget)
        for s in range(widget.live.session.n_slices):
            widget.live.jump_to(s)
            assert widget.live.current_slice() == s
            res = widget.live.last_compare
            pred, g = np.asarray(mask.data), np.asarray(gt.data)
            assert res["volume_dice"] == pytest.approx(_dice(pred, g), abs=1e-12)
            exp_slice = _dice(np.take(pred, s, axis=ax), np.take(g, s, axis=ax))
            assert res["slice_dice"] == pytest.approx(exp_slice, abs=1e-12, nan_ok=True)
            per = [_dice(np.take(pred, t, axis=ax), np.take(g, t, axis=ax)) for t in range(pred.shape[ax])
                   if np.take(g, t, axis=ax).any()]
            assert res["mean_slice_dice"] == pytest.approx(float(np.mean(per)), abs=1e-12)
            assert f"Dice, volume (3D): {_dice(pred, g):.3f}" in widget.dice_info.value
            assert f"Dice, slice {s} " in widget.dice_info.value
    # False positives and negatives as an overlay.
    widget.show_errors.value = True
    errs = _layer(viewer, " FP/FN")
    pred, g = np.asarray(mask.data) != 0, np.asarray(gt.data) != 0
    assert int((errs.data == 1).sum()) == int((pred & ~g).sum())
    assert int((errs.data == 2).sum()) == int((~pred & g).sum())
    widget.show_errors.value = False
    assert not [lay for lay in viewer.layers if lay.name.endswith(" FP/FN")]


def test_profile_jumps_to_the_most_anomalous_slice(shown):
    viewer, widget, image, gt = shown
    scores = widget.live.session.result.image_scores
    s = widget.live.next_anomalous()
    assert s == int(np.argmax(scores))
    assert widget.live.current_slice() == s
    assert widget.profile.current == s
    widget.profile.slice_clicked.emit(0)
    assert widget.live.current_slice() == 0


def test_cancel_stops_the_worker_and_adds_no_layer(setup, qtbot, count_calls):
    viewer, widget, image, gt = setup
    # A volume whose embeddings are not cached, so the run spends its time in the encoder.
    noisy = image.data + np.random.default_rng(7).normal(0, 5, image.data.shape).astype(np.float32)
    layer = viewer.add_image(noisy, name="noisy", affine=image.affine.affine_matrix, metadata=dict(image.metadata))
    widget.image.value = layer
    widget.batch_size.value = 1
    names = [lay.name for lay in viewer.layers]
    job = widget.run()
    wait_until(qtbot, lambda: count_calls["encode"] >= 1, timeout=120)
    widget.cancel()
    wait_until(qtbot, lambda: job.done, timeout=120)
    assert count_calls["encode"] < 3  # stopped before encoding every slice
    assert [lay.name for lay in viewer.layers] == names  # nothing added, nothing half-written
    assert widget.live is None
    assert "cancelled" in widget.status.value
    assert widget.run_btn.enabled and not widget.cancel_btn.enabled
    assert not list(EmbeddingCache().root.glob("*.part*"))


def test_user_errors_are_notifications(setup, qtbot, errors, sample_bank, make_napari_viewer):
    viewer, widget, image, gt = setup
    # No bank.
    widget.bank = None
    assert widget.run() is None
    assert "no memory bank" in errors[-1]
    widget.set_bank(sample_bank)
    # 2D and 4D layers.
    for data in (np.zeros((20, 20), np.float32), np.zeros((2, 3, 20, 20), np.float32)):
        lay = viewer.add_image(data, name=f"bad{data.ndim}d")
        widget.image.value = lay
        assert widget.run() is None
        assert "3D" in errors[-1]
    # A bank made with another backbone.
    other = copy.copy(sample_bank)
    other.manifest = dict(sample_bank.manifest, backbone=dict(sample_bank.manifest["backbone"], name="sam-vit_b"))
    widget.set_bank(other)
    widget.image.value = image
    assert widget.run() is None
    assert "sam-vit_b" in errors[-1] and "litemedsam" in errors[-1]
    # A SAM backbone without its checkpoint file.
    widget.backbone_choice.value = "sam-vit_b"
    assert widget.run() is None
    assert "checkpoint" in errors[-1]
    assert all(isinstance(e, str) and "Traceback" not in e for e in errors)


def test_ground_truth_of_another_shape_is_refused(shown, errors):
    viewer, widget, image, gt = shown
    other = viewer.add_labels(np.zeros((2, 5, 5), np.uint8), name="other gt")
    widget.gt.value = other
    assert "shape" in errors[-1]
    assert widget.gt.value is None
    assert widget.live.last_compare is None


def test_bank_build_save_and_load_through_the_widget(setup, qtbot, sample_subset, tmp_path, errors):
    viewer, widget, image, gt = setup
    widget.bank = None
    widget.normal_files.value = (sample_subset["normals"][0],)
    widget.build_bank()
    wait_until(qtbot, lambda: widget.job.done, timeout=300)
    assert widget.bank is not None, widget.status.value
    assert "3 slices of 1 sources" in widget.bank_info.value and "not saved yet" in widget.bank_info.value
    assert widget.bank.backbone["name"] == "litemedsam"
    target = tmp_path / "picked"
    target.mkdir()  # an empty folder chosen in the dialog
    widget.bank_path.value = target
    widget.save_bank()
    wait_until(qtbot, lambda: widget.job.done)
    assert (target / "manifest.json").is_file() and (target / "index.faiss").is_file()
    widget.save_bank()  # never over an existing bank
    wait_until(qtbot, lambda: widget.job.done)
    assert "already exists" in errors[-1]
    widget.bank = None
    widget.load_bank()
    wait_until(qtbot, lambda: widget.job.done)
    assert widget.bank is not None and widget.bank.ntotal == 3 * 1024
    assert f"folder: {target}" in widget.bank_info.value
    widget.bank_path.value = tmp_path / "nothing-here"
    widget.load_bank()
    wait_until(qtbot, lambda: widget.job.done)
    assert "not a memory bank folder" in errors[-1]


def test_a_run_takes_its_banks_encoding(make_napari_viewer, monkeypatch, tmp_path):
    """The backbone of a run is loaded with the bank's encoding (a SAM bank built with
    ``--encoding reference`` runs as the paper's code); the key tells the two apart."""
    import napari_mias_sam.backbones as backbones_mod
    from napari_mias_sam.viewer.widget import MiasSamWidget

    widget = MiasSamWidget(make_napari_viewer())
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    ckpt.write_bytes(b"not read here")
    widget.backbone_choice.value = "sam-vit_b"
    widget.checkpoint.value = str(ckpt)
    key = widget.selected_backbone_key("reference")
    assert key == ("sam-vit_b", str(ckpt), str(widget.device.value), "reference")
    assert widget.selected_backbone_key() != key  # a standard run needs another backbone
    seen = {}
    monkeypatch.setattr(backbones_mod, "load_backbone", lambda *a, **k: seen.update(k) or "loaded")
    assert widget.get_backbone(key, lambda *a: None) == "loaded" and seen["encoding"] == "reference"
