"""``mias-sam qa-report`` on two hand-written QA files whose summary is worked out by hand below,
its outputs (JSON, Markdown, the displacement plot), and bad QA files refused with one line and
nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_mias_sam.cli.commands import main
from napari_mias_sam.data.qa_table import QA_COLUMNS, qa_csv_text

NAN = float("nan")


def _row(s, status, score, lesion, before, after, disp, d0, d1, prompt="box"):
    return {"slice": s, "i": 10.0, "j": 20.0, "k": float(s), "image_score": score, "predicted_iou": 0.9, "anomalous": 1,
            "prompt": prompt, "status": status, "orig_i": 10.0, "orig_j": 20.0, "orig_k": float(s), "displacement_mm": disp,
            "has_lesion": lesion, "in_lesion_before": before, "in_lesion_after": after, "slice_dice_before": d0,
            "slice_dice_after": d1}


def _write(path, volume, rows, vd0, vd1):
    common = {"volume": volume, "volume_shape": f"30x40x{len(rows)}", "affine": json.dumps(list(map(float, range(16)))),
              "backbone": "litemedsam", "settings": "{\"gamma\":5.0}", "volume_dice_before": vd0, "volume_dice_after": vd1}
    path.write_text(qa_csv_text([dict(r, **common) for r in rows]))
    return path


@pytest.fixture
def two_reviews(tmp_path):
    a = _write(tmp_path / "a_qa.csv", "a", [
        _row(0, "", 0.1, False, None, None, None, NAN, NAN, prompt="none"),  # no prompt: nothing to review
        _row(1, "accepted", 2.0, True, True, True, 0.0, 0.8, 0.8),
        _row(2, "corrected", 1.5, True, False, True, 6.0, 0.2, 0.7),
        _row(3, "rejected", 0.9, False, False, False, 0.0, 0.0, NAN),
    ], 0.5, 0.7)
    b = _write(tmp_path / "b_qa.csv", "b", [
        _row(0, "corrected", 3.0, True, False, False, 2.0, 0.1, 0.3),
        _row(1, "pending", 1.0, True, True, True, 0.0, 0.6, 0.6),
        _row(2, "rejected", 2.5, True, True, False, 0.0, 0.4, 0.0),
    ], 0.4, 0.3)
    return a, b


def test_qa_report_numbers_match_the_hand_computed_example(two_reviews, tmp_path, capsys):
    a, b = two_reviews
    out = tmp_path / "report"
    assert main(["qa-report", str(a), str(b), "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    va, vb, allv = res["volumes"][0], res["volumes"][1], res["overall"]
    # a: 3 prompted slices, all reviewed; lesion slices 1 and 2: CoG inside on 1 of 2 before, 2 of 2 after;
    # one correction of 6 mm; slice Dice over lesion slices (0.8 + 0.2) / 2 -> (0.8 + 0.7) / 2.
    assert {k: va[k] for k in ("prompted", "reviewed", "accepted", "corrected", "rejected", "pending")} == \
        {"prompted": 3, "reviewed": 3, "accepted": 1, "corrected": 1, "rejected": 1, "pending": 0}
    assert (va["hit_rate_before"], va["hit_rate_after"], va["median_displacement_mm"]) == (0.5, 1.0, 6.0)
    assert va["slice_dice_before"] == pytest.approx(0.5) and va["slice_dice_after"] == pytest.approx(0.75)
    assert (va["volume_dice_before"], va["volume_dice_after"]) == (0.5, 0.7)
    # b: 2 of 3 reviewed; lesion on all 3: inside before on slices 1, 2 (2/3); after only slice 1, as the
    # rejected slice 2 keeps no prompt (1/3); slice Dice (0.1 + 0.6 + 0.4) / 3 -> (0.3 + 0.6 + 0) / 3.
    assert (vb["reviewed"], vb["pending"], vb["corrected"], vb["rejected"]) == (2, 1, 1, 1)
    assert vb["hit_rate_before"] == pytest.approx(2 / 3) and vb["hit_rate_after"] == pytest.approx(1 / 3)
    assert vb["median_displacement_mm"] == 2.0
    assert vb["slice_dice_before"] == pytest.approx(1.1 / 3) and vb["slice_dice_after"] == pytest.approx(0.3)
    # Overall: slices pooled (hits 3/5 -> 3/5; corrections 6 and 2 mm: median 4; slice Dice 2.1/5 -> 2.4/5),
    # the volume Dice averaged over the two volumes.
    assert (allv["volumes"], allv["reviewed"], allv["prompted"], allv["corrected"], allv["rejected"]) == (2, 5, 6, 2, 2)
    assert allv["hit_rate_before"] == pytest.approx(0.6) and allv["hit_rate_after"] == pytest.approx(0.6)
    assert allv["median_displacement_mm"] == 4.0
    assert allv["slice_dice_before"] == pytest.approx(0.42) and allv["slice_dice_after"] == pytest.approx(0.48)
    assert allv["volume_dice_before"] == pytest.approx(0.45) and allv["volume_dice_after"] == pytest.approx(0.5)
    assert sorted((c["volume"], c["displacement_mm"], c["image_score"]) for c in allv["corrections"]) == \
        [("a", 6.0, 1.5), ("b", 2.0, 3.0)]
    # The files: the same summary, a Markdown table, the plot.
    assert json.loads((out / "qa_report.json").read_text())["overall"]["median_displacement_mm"] == 4.0
    md = (out / "qa_report.md").read_text()
    assert "| a | 3 of 3 | 1 | 1 | 1 | 0 | 50.0 % | 100.0 % | 6.0 | 0.500 | 0.750 | 0.500 | 0.700 |" in md
    with Image.open(out / "qa_displacement.png") as im:
        assert im.size == (720, 480) and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 5
    # A folder argument reads every *_qa.csv in it; the text report is the Markdown table.
    assert main(["qa-report", str(tmp_path)]) == 0
    assert "| **all (2 volumes)** | 5 of 6 | 1 | 2 | 2 | 1 | 60.0 % | 60.0 % | 4.0 | 0.420 | 0.480 | 0.450 | 0.500 |" in capsys.readouterr().out


def test_bad_qa_files_are_refused_with_one_line_and_nothing_written(two_reviews, tmp_path, capsys):
    a, b = two_reviews
    out = tmp_path / "report"
    lines = a.read_text().splitlines()
    drop = lines[0].split(",").index("displacement_mm")
    bad = tmp_path / "c_qa.csv"
    bad.write_text("\n".join(",".join(x for n, x in enumerate(line.split(",")) if n != drop) for line in lines) + "\n")
    cases = [
        ([str(a), str(bad)], "c_qa.csv: not a MIAS-SAM QA file: missing column displacement_mm"),
        ([str(a), str(a)], "volume 'a' is already given by"),
        ([str(tmp_path / "missing_qa.csv")], "no such QA file"),
        ([str(tmp_path / "report-nowhere")], "no such QA file"),
    ]
    (tmp_path / "points.csv").write_text("slice,i,j,k\n0,1,2,3\n")
    cases.append(([str(tmp_path / "points.csv")], "missing columns"))
    for args, message in cases:
        assert main(["qa-report", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not out.exists()
    # An earlier report is kept unless --overwrite.
    assert main(["qa-report", str(a), "--out", str(out)]) == 0
    before = (out / "qa_report.json").read_bytes()
    assert main(["qa-report", str(a), str(b), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "qa_report.json").read_bytes() == before
    assert main(["qa-report", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    assert len(QA_COLUMNS) == len(set(QA_COLUMNS))


def test_qa_report_adds_up_the_saved_lesions(tmp_path, capsys):
    rows = [_row(0, "accepted", 2.0, True, True, True, 0.0, 0.8, 0.8)]
    lesion_a = {"lesions": 3, "lesions_accepted": 1, "lesions_rejected": 1, "lesionwise_dice": 0.5, "lesionwise_hd95": 100.0,
                "true_lesions": 2, "lesions_detected": 2, "lesions_missed": 0, "lesions_false_positive": 1}
    lesion_b = dict(lesion_a, lesions=1, lesions_rejected=0, lesionwise_dice=0.9, lesionwise_hd95=2.0, true_lesions=2,
                    lesions_detected=1, lesions_missed=1, lesions_false_positive=0)
    a = _write(tmp_path / "a_qa.csv", "a", [dict(r, **lesion_a) for r in rows], 0.5, 0.5)
    b = _write(tmp_path / "b_qa.csv", "b", [dict(r, **lesion_b) for r in rows], 0.5, 0.5)
    old = _write(tmp_path / "c_qa.csv", "c", rows, 0.5, 0.5)  # saved before lesions existed: no lesion columns filled
    assert main(["qa-report", str(a), str(b), str(old), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    allv = res["overall"]
    assert (allv["lesions"], allv["lesions_rejected"], allv["lesions_missed"], allv["lesions_false_positive"]) == (4, 1, 1, 1)
    assert allv["lesionwise_dice"] == pytest.approx(0.7) and allv["lesionwise_hd95"] == pytest.approx(51.0)
    assert res["volumes"][2]["lesions"] is None
    assert main(["qa-report", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "| a | 3 | 1 | 1 | 0.500 | 100.0 | 2 | 2 | 0 | 1 |" in text and "| **all** | 4 |" in text


def test_the_viewer_reads_qa_files_with_the_same_checks(tmp_path):
    """The napari reader of a saved review refuses what qa-report refuses, naming the line: a file
    cut short, a Dice out of range (tests/reliability_inputs.py makes the damaged files)."""
    from napari_mias_sam.core.errors import InputError
    from napari_mias_sam.viewer.models.review import qa_points_layer
    from reliability_inputs import qa_file

    data, kwargs, kind = qa_points_layer(qa_file(tmp_path, "good", "good_qa.csv"))
    assert kind == "points" and len(data) == 3
    for damage, says in (("cut-in-affine", "line 5 ends after 23 of the 34 columns"), ("dice-5e300", "line 4: slice_dice_before"),
                         ("rows-missing", "after 2 of the volume's 4 slices")):
        with pytest.raises(InputError, match=says.replace("(", r"\(")):
            qa_points_layer(qa_file(tmp_path, damage, f"{damage}_qa.csv"))
