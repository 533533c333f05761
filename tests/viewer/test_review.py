"""The review of prompt placement without a viewer: statuses and what they do to the masks, the
review carried into a rerun, the QA table (its columns shared with <stem>_points.csv, the
ground-truth fields), saving and reading it back, and QA files of another volume refused."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_mias_sam.core.errors import InputError
from napari_mias_sam.jobs.outputs import write_outputs
from napari_mias_sam.data.qa_table import LESION_QA_COLUMNS, QA_COLUMNS, SHARED_COLUMNS, qa_csv_text, read_qa
from napari_mias_sam.viewer.models.live import LiveSession
from napari_mias_sam.viewer.models.review import apply_table, qa_rows, save_results
from test_live import _result, disc_backbone


def _session(**kw) -> LiveSession:
    return LiveSession(_result(axis=0, shape=(4, 50, 60)), disc_backbone(), (0, 1, 2), **kw)


def _decode(ses: LiveSession) -> None:
    list(ses.refresh_iter(sorted(ses.stale), ses.generation))


def test_statuses_accept_reject_reset_and_next_pending():
    ses = _session()
    assert [ses.status(s) for s in range(4)] == ["pending"] * 4
    assert ses.result.slice_mask(2).any()
    assert ses.review(0, "accept") == [] and ses.status(0) == "accepted"
    assert ses.review(2, "reject") == [2]
    _decode(ses)
    assert ses.status(2) == "rejected" and not ses.result.slice_mask(2).any()  # "no anomaly here": cleared
    assert ses.result.prompts[2] is not None  # the point stays, to be seen and reset
    ses.move_point(1, (1.0, 10.0, 45.0))  # a drag corrects
    assert ses.status(1) == "corrected"
    assert ses.review(1, "accept") == [] and ses.status(1) == "corrected"  # accepting keeps the correction
    # The method's own centre of a corrected slice: without the decoder, the same as with it.
    np.testing.assert_allclose(ses.method_slice(1, with_mask=False)[0], ses.method_slice(1)[0], atol=1e-9)
    assert ses.review_counts() == {"pending": 1, "accepted": 1, "corrected": 1, "rejected": 1, "prompted": 4}
    assert ses.next_pending(0) == 3 and ses.next_pending(3) == 3  # round the volume, back to itself
    assert ses.next_pending(0, -1) == 3
    # A settings change re-decodes every slice: the rejected one stays cleared.
    from dataclasses import replace

    ses.change_settings(replace(ses.settings, gamma=2.0))
    _decode(ses)
    assert not ses.result.slice_mask(2).any() and ses.result.slice_mask(3).any()
    # Reset: pending again, the method's point and mask back.
    before = ses.method_slice(1)[0]
    assert sorted(ses.review(1, "reset") + ses.review(2, "reset")) == [1, 2]
    _decode(ses)
    assert ses.status(1) == ses.status(2) == "pending" and ses.result.slice_mask(2).any()
    np.testing.assert_allclose(ses.result.cog_voxel(1), before, atol=1e-6)
    assert ses.metadata()["review"] == {"0": "accepted"}
    with pytest.raises(ValueError):
        ses.review(0, "approve")


def test_the_methods_own_slice_is_decoded_aside():
    """The QA table's "before" (``method_slice``) decodes the method's own prompt beside the result:
    during and after that decode the result holds the review's prompt, mask and settings (nothing
    is swapped out and back, so a viewer drawing the result meanwhile sees the correction)."""
    ses = _session()
    ses.move_point(1, (1.0, 10.0, 45.0))
    _decode(ses)
    r = ses.result
    corrected, logits, settings = r.prompts[1], r.logits[1].copy(), r.settings
    seen, decode = [], ses.backbone.decode

    def watching(*args, **kwargs):
        seen.append(r.prompts[1] is corrected and r.settings is settings and np.array_equal(r.logits[1], logits))
        return decode(*args, **kwargs)

    ses.backbone.decode = watching
    ijk, mask = ses.method_slice(1)
    assert seen == [True]  # one decode, with the result untouched meanwhile
    assert r.prompts[1] is corrected and np.array_equal(r.logits[1], logits) and r.settings is settings
    assert mask.any() and np.linalg.norm(np.subtract(ijk, r.cog_voxel(1))) > 1.0  # the method's point, not the moved one
    assert ses.method_slice(1)[0] == ijk and seen == [True]  # cached: no second decode


def test_a_rerun_keeps_corrections_and_rejections():
    ses = _session()
    ses.move_point(1, (1.0, 10.0, 45.0))
    ses.review(2, "reject")
    ses.review(3, "accept")
    again = _session(overrides=ses.overrides, statuses=ses.statuses)  # what the widget passes to a rerun
    assert again.stale == {1, 2}
    _decode(again)
    assert [again.status(s) for s in range(4)] == ["pending", "corrected", "rejected", "accepted"]
    assert not again.result.slice_mask(2).any() and again.result.slice_mask(1).any()
    np.testing.assert_allclose(again.point(1), (1.0, 10.0, 45.0), atol=1e-6)


def _gt_disc(ses: LiveSession, s: int, centre, radius: float) -> np.ndarray:
    gt = np.zeros(ses.result.volume.shape, bool)
    rr, cc = np.mgrid[: gt.shape[1], : gt.shape[2]]
    gt[s] = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2
    return gt


def test_qa_rows_share_the_points_columns_and_measure_the_review(tmp_path):
    ses = _session()
    res = ses.result
    orig1 = res.cog_voxel(1)
    gt = _gt_disc(ses, 1, (10, 45), 6)  # the lesion is away from slice 1's computed CoG
    ses.move_point(1, (1.0, 10.0, 45.0))  # corrected into the lesion
    ses.review(2, "reject")
    _decode(ses)
    rows = qa_rows(ses, gt)
    assert list(rows[0])[: len(SHARED_COLUMNS)] == list(SHARED_COLUMNS)
    # The shared columns are the CLI's <stem>_points.csv, value for value.
    paths = write_outputs(res, tmp_path / "cli", stem="v")
    cli = list(csv.DictReader(paths["points"].open()))
    ours = list(csv.DictReader(__import__("io").StringIO(qa_csv_text(rows))))
    assert [{c: r[c] for c in SHARED_COLUMNS} for r in ours] == [{c: r[c] for c in SHARED_COLUMNS} for r in cli]
    assert list(cli[0])[: len(SHARED_COLUMNS)] == list(SHARED_COLUMNS)  # the CLI's file adds the mask rule after them
    r1 = rows[1]
    assert r1["status"] == "corrected" and (r1["orig_i"], r1["orig_j"], r1["orig_k"]) == tuple(round(v, 2) for v in orig1)
    spacing = np.asarray(res.volume.spacing)
    assert r1["displacement_mm"] == pytest.approx(np.linalg.norm((np.asarray(res.cog_voxel(1)) - orig1) * spacing))
    assert r1["has_lesion"] and r1["in_lesion_before"] is False and r1["in_lesion_after"] is True
    assert r1["slice_dice_after"] > r1["slice_dice_before"]
    assert rows[2]["status"] == "rejected" and rows[2]["has_lesion"] is False and rows[2]["in_lesion_after"] is False
    assert np.isnan(rows[2]["slice_dice_after"]) and rows[2]["slice_dice_before"] == 0.0  # mask cleared on a lesion-free slice
    assert rows[0]["volume_dice_after"] > rows[0]["volume_dice_before"]
    # Without a ground truth the ground-truth columns stay empty.
    assert qa_rows(ses)[1].get("has_lesion") is None


def test_save_reopen_and_apply_gives_the_same_state(tmp_path):
    ses = _session()
    ses.move_point(1, (1.0, 10.0, 45.0))
    ses.review(2, "reject")
    ses.review(0, "accept")
    _decode(ses)
    rows = qa_rows(ses)
    out = tmp_path / "results"
    paths = save_results(ses, rows, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["volume_mask.nii.gz", "volume_anomaly.nii.gz",
                                                             "volume_points.csv", "volume_qa.csv",
                                                             "volume_lesions.nii.gz", "volume_lesions.csv"])
    table = read_qa(paths["qa"])
    assert table.volume == "volume" and table.shape == (4, 50, 60) and table.backbone == "disc"
    assert [table.status(s) for s in range(4)] == ["accepted", "corrected", "rejected", "pending"]
    np.testing.assert_allclose(table.affine, np.eye(4))
    fresh = _session()
    apply_table(fresh, table)
    _decode(fresh)
    assert [fresh.status(s) for s in range(4)] == ["accepted", "corrected", "rejected", "pending"]
    np.testing.assert_allclose(fresh.point(1), ses.point(1), atol=0.02)
    assert not fresh.result.slice_mask(2).any()
    # Saving again replaces the same volume's review.
    ses.review(3, "accept")
    save_results(ses, qa_rows(ses), out)
    assert read_qa(out / "volume_qa.csv").status(3) == "accepted"


def test_bad_qa_files_are_refused_with_one_line(tmp_path):
    ses = _session()
    good = tmp_path / "volume_qa.csv"
    good.write_text(qa_csv_text(qa_rows(ses)))
    other = LiveSession(_result(axis=0, shape=(5, 50, 60)), disc_backbone(), (0, 1, 2))
    with pytest.raises(InputError, match="QA file of volume 'volume' \\(4x50x60, 4 slices\\), not of 'volume' \\(5x50x60") as e:
        apply_table(other, read_qa(good))
    assert "\n" not in str(e.value)
    lines = good.read_text().splitlines()
    head = lines[0].split(",")
    drop = head.index("status")
    bad = tmp_path / "bad_qa.csv"
    bad.write_text("\n".join(",".join(c for n, c in enumerate(line.split(",")) if n != drop) for line in lines[:1]) + "\n")
    with pytest.raises(InputError, match="missing column status;"):
        read_qa(bad)
    bad.write_text(lines[0] + "\n" + lines[1].replace("pending", "approved", 1) + "\n")
    with pytest.raises(InputError, match="status 'approved'"):
        read_qa(bad)
    with pytest.raises(InputError, match="no such QA file"):
        read_qa(tmp_path / "nope_qa.csv")
    # A results folder of another volume is not overwritten.
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "volume_mask.nii.gz").write_bytes(b"someone else's")
    with pytest.raises(InputError, match="not from a review of 'volume'"):
        save_results(ses, qa_rows(ses), tmp_path / "res")
    assert (tmp_path / "res" / "volume_mask.nii.gz").read_bytes() == b"someone else's"
    assert set(QA_COLUMNS) | set(LESION_QA_COLUMNS) >= set(head)


def test_a_qa_file_opens_as_the_reviewed_points_where_the_session_had_them(tmp_path):
    from napari_mias_sam.viewer.models.review import QA_LAYER_KEY, qa_points_layer

    ses = _session()
    ses.move_point(1, (1.0, 10.0, 45.0))
    ses.review(2, "reject")
    _decode(ses)
    path = tmp_path / "volume_qa.csv"
    path.write_text(qa_csv_text(qa_rows(ses)))
    data, kwargs, kind = qa_points_layer(path)
    from napari_mias_sam.viewer.models.layers import display_axes

    axes = display_axes(ses.result.volume.affine)  # the order the reader gives the volume's image layer
    assert kind == "points" and kwargs["name"] == "volume CoG (review)"
    want = [np.asarray(ses.result.cog_voxel(s))[list(axes)] for s in range(4)]
    np.testing.assert_allclose(data, want, atol=0.01)
    assert list(kwargs["features"]["status"]) == ["pending", "corrected", "rejected", "pending"]
    assert kwargs["face_color"] == ["red", "orange", "gray", "red"]
    assert kwargs["metadata"][QA_LAYER_KEY]["volume"] == "volume"
