"""``mias-sam segment`` on PNG slices (BMAD users' way): outputs per slice and one prompts CSV,
reference normalisation over the slices of one call, refusals with exit 2 and nothing written,
no overwriting without --overwrite, atomic writes. The fake backbone (tests/fakes.py)
stands in where speed matters; the last test runs the real LiteMedSAM on a few PNGs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import napari_mias_sam.backbones as backbones_mod
from core_fixtures import sha256, snapshot
from fakes import intensity_disc_fake
from napari_mias_sam.cli.commands import main

SIZE = 64
YY, XX = np.mgrid[:SIZE, :SIZE]
LESION = (20, 40)  # (row, column) of the bright disc in the lesion slices


def head(seed: int, lesion: bool) -> np.ndarray:
    """An 8-bit grey 'head' (ellipse with noise), optionally with a bright disc of radius 5."""
    r = np.random.default_rng(seed)
    img = np.zeros((SIZE, SIZE), np.float32)
    img[((YY - 32) / 26) ** 2 + ((XX - 32) / 28) ** 2 < 1] = 110
    img += r.normal(0, 4, img.shape)
    if lesion:
        img[(YY - LESION[0]) ** 2 + (XX - LESION[1]) ** 2 < 25] = 240
    return np.clip(img, 0, 255).astype(np.uint8)


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def fake_loader(name="fake", checkpoint=None, device=None, **kwargs):
    return intensity_disc_fake()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIAS_SAM_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setattr(backbones_mod, "load_backbone", fake_loader)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """A BMAD-style bank (train/good) built by the CLI, and a folder of test PNGs: two with a lesion, one normal."""
    root = tmp_path_factory.mktemp("png")
    for i in range(6):
        write_png(root / "bmad" / "train" / "good" / f"{i:03d}.png", head(i, False))
    test = root / "test"
    files = [write_png(test / "a_lesion.png", head(10, True)), write_png(test / "b_lesion.png", head(11, True)),
             write_png(test / "c_normal.png", head(12, False))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIAS_SAM_CACHE", str(root / "user-cache"))
        mp.setattr(backbones_mod, "load_backbone", fake_loader)
        assert main(["build-bank", str(root / "bmad"), "--out", str(root / "bank"), "--json"]) == 0
    return {"root": root, "test": test, "files": files, "bank": root / "bank"}


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_png_folder_outputs(pngs, tmp_path, capsys):
    out = tmp_path / "out"
    before = snapshot(pngs["test"])
    rc, so, err = run(["segment", str(pngs["test"]), "--bank", str(pngs["bank"]), "--out", str(out),
                       "--normalisation", "reference", "--prompt", "cog-point", "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(so)
    assert rep["slices"] == 3 and rep["settings"]["normalisation"] == "reference"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}_mask.png" for s in ("a_lesion", "b_lesion", "c_normal")]
        + [f"{s}_anomaly.npy" for s in ("a_lesion", "b_lesion", "c_normal")] + ["prompts.csv"])
    for f in pngs["files"]:
        with Image.open(out / f"{f.stem}_mask.png") as im:
            mask = np.asarray(im)
        assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
        amap = np.load(out / f"{f.stem}_anomaly.npy", allow_pickle=False)
        assert amap.dtype == np.float32 and amap.shape == (SIZE, SIZE)
    rows = read_csv(out / "prompts.csv")
    assert [r["file"] for r in rows] == ["a_lesion.png", "b_lesion.png", "c_normal.png"]
    assert list(rows[0]) == ["file", "x", "y", "prompt", "image_score", "predicted_iou", "anomalous"]
    for r in rows[:2]:  # the prompt centre is on the lesion, in the PNG's pixels (x = column, y = row)
        assert r["prompt"] == "cog-point"
        assert abs(float(r["x"]) - LESION[1]) < 2.5 and abs(float(r["y"]) - LESION[0]) < 2.5
        with Image.open(out / f"{Path(r['file']).stem}_mask.png") as im:
            assert np.asarray(im)[round(float(r["y"])), round(float(r["x"]))] == 255
    # reference normalisation spans the call: the lesion slices' maps reach 1, the normal one stays low
    maps = {f.stem: np.load(out / f"{f.stem}_anomaly.npy") for f in pngs["files"]}
    assert max(float(m.max()) for m in maps.values()) == pytest.approx(1.0, abs=0.05)
    assert float(maps["c_normal"].max()) < 0.6
    assert snapshot(pngs["test"]) == before


def test_reference_normalisation_is_over_the_call(pngs, tmp_path, capsys):
    """The normal slice alone is min-max normalised over itself; with the lesion slices, over all three."""
    normal = pngs["test"] / "c_normal.png"
    rc, _, err = run(["segment", str(normal), "--bank", str(pngs["bank"]), "--out", str(tmp_path / "alone"),
                      "--normalisation", "reference"], capsys)
    assert rc == 0, err
    rc, _, err = run(["segment", *map(str, pngs["files"]), "--bank", str(pngs["bank"]), "--out", str(tmp_path / "all"),
                      "--normalisation", "reference"], capsys)
    assert rc == 0, err
    alone = np.load(tmp_path / "alone" / "c_normal_anomaly.npy")
    together = np.load(tmp_path / "all" / "c_normal_anomaly.npy")
    assert float(alone.max()) > 0.9 and float(together.max()) < 0.6
    # calibrated normalisation does not depend on the other slices of the call
    for name in ("cal-alone", "cal-all"):
        files = [normal] if name == "cal-alone" else pngs["files"]
        assert main(["segment", *map(str, files), "--bank", str(pngs["bank"]), "--out", str(tmp_path / name)]) == 0
    # (up to the float rounding of faiss's batched distances, about 1e-3 here)
    np.testing.assert_allclose(np.load(tmp_path / "cal-alone" / "c_normal_anomaly.npy"),
                               np.load(tmp_path / "cal-all" / "c_normal_anomaly.npy"), atol=5e-3)


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_mixed_sizes_refused_and_nothing_written(pngs, tmp_path, capsys):
    odd = write_png(tmp_path / "in" / "odd.png", head(3, True)[:48])
    out = tmp_path / "out"
    rc, so, err = run(["segment", str(pngs["files"][0]), str(odd), "--bank", str(pngs["bank"]), "--out", str(out)], capsys)
    assert rc == 2 and so == ""
    msg = one_line_error(err)
    assert "odd.png" in msg and "64x48" in msg and "64x64" in msg and "one size" in msg
    assert not out.exists()


@pytest.mark.parametrize("case", ["nifti-among-pngs", "gt", "out-is-input", "nifti-bank", "missing-png", "device-bogus",
                                  "fp16-on-cpu"])
def test_refusals(pngs, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = ["segment", str(pngs["test"]), "--bank", str(pngs["bank"]), "--out", str(out)]
    want = {"nifti-among-pngs": "separate calls", "gt": "--gt", "out-is-input": "another --out",
            "nifti-bank": "PNG slices need a bank", "missing-png": "no such PNG",
            # the device and precision checks of volumes (the PNG branch skipped them before the one run path)
            "device-bogus": "not a device", "fp16-on-cpu": "--precision fp16"}[case]
    if case == "device-bogus":
        args += ["--device", "gpu0"]
    elif case == "fp16-on-cpu":
        args += ["--device", "cpu", "--precision", "fp16"]
    elif case == "nifti-among-pngs":
        vol = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), vol)
        args.insert(2, str(vol))
    elif case == "gt":
        args += ["--gt", str(pngs["files"][0])]
    elif case == "out-is-input":
        args[args.index(str(out))] = str(pngs["test"])
        out = pngs["test"]
    elif case == "nifti-bank":
        vols = tmp_path / "normals"
        vols.mkdir()
        rng = np.random.default_rng(0)
        for i in range(2):
            nib.save(nib.Nifti1Image(rng.normal(100, 10, (32, 32, 3)).astype(np.float32), np.eye(4)), vols / f"n{i}.nii.gz")
        assert main(["build-bank", str(vols), "--out", str(tmp_path / "vbank")]) == 0
        capsys.readouterr()
        args[args.index(str(pngs["bank"]))] = str(tmp_path / "vbank")
    elif case == "missing-png":
        args.insert(2, str(tmp_path / "nope.png"))
    before = snapshot(pngs["test"])
    rc, so, err = run(args, capsys)
    assert rc == 2 and so == ""
    assert want in one_line_error(err)
    assert snapshot(pngs["test"]) == before
    if case != "out-is-input":
        assert not out.exists() or not any(out.iterdir())


def test_no_overwrite_without_flag(pngs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", str(pngs["test"]), "--bank", str(pngs["bank"]), "--out", str(out)]
    assert run(args, capsys)[0] == 0
    before = snapshot(out)
    rc, so, err = run(args, capsys)
    assert rc == 2 and "already exists" in one_line_error(err)
    assert snapshot(out) == before
    # one existing output is enough to refuse the whole call (nothing else is written either)
    (out / "a_lesion_mask.png").unlink()
    (out / "prompts.csv").write_text("mine\n")
    rc, _, err = run(args, capsys)
    assert rc == 2 and "prompts.csv" in one_line_error(err)
    assert not (out / "a_lesion_mask.png").exists() and (out / "prompts.csv").read_text() == "mine\n"
    assert run(args + ["--overwrite"], capsys)[0] == 0
    assert (out / "a_lesion_mask.png").is_file() and (out / "prompts.csv").read_text().startswith("file,x,y")


def test_a_failing_write_leaves_nothing(pngs, tmp_path, capsys, monkeypatch):
    """The outputs of a call are written to temporary files and renamed together: a failure half-way
    leaves neither new files nor temporary ones, and earlier outputs stay as they were."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    real_save = np.save
    calls = {"n": 0}

    def failing_save(fh, arr, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(fh, arr, **kw)

    import napari_mias_sam.jobs.png_runs as ps

    monkeypatch.setattr(ps.np, "save", failing_save)
    rc = main(["segment", str(pngs["test"]), "--bank", str(pngs["bank"]), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "disk full" in err[-1] and "no partial outputs" in err[-1]  # one line, no traceback
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_api_outputs_match_cli(pngs, tmp_path):
    """segment_pngs + write_png_outputs (the functions the CLI calls) give the same files."""
    from napari_mias_sam.bank import load_bank
    from napari_mias_sam.jobs.png_runs import png_inputs, segment_pngs, write_png_outputs
    from napari_mias_sam.pipeline.settings import SegmentSettings

    files = png_inputs([pngs["test"]])
    assert files == pngs["files"]
    res = segment_pngs(files, load_bank(pngs["bank"]), intensity_disc_fake(), SegmentSettings(normalisation="reference"))
    paths = write_png_outputs(res, files, tmp_path / "api")
    assert main(["segment", str(pngs["test"]), "--bank", str(pngs["bank"]), "--out", str(tmp_path / "cli"),
                 "--normalisation", "reference"]) == 0
    for p in paths.values():
        assert sha256(p) == sha256(tmp_path / "cli" / p.name)


# --------------------------------------------------------------------------- real LiteMedSAM
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def slice_u8(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k min-max scaled to 8 bits, as BMAD saved its slices."""
    s = volume[..., k].astype(np.float64)
    return np.rint((s - s.min()) / max(np.ptp(s), 1e-9) * 255).astype(np.uint8)


@pytest.mark.slow
def test_litemedsam_on_png_slices(tmp_path, capsys, monkeypatch):
    """The real bundled LiteMedSAM: a BMAD-style bank from the slices of a normal volume saved as PNGs,
    then segment two PNG slices of the test case (one through the lesion) with the CLI."""
    monkeypatch.undo()
    monkeypatch.setenv("MIAS_SAM_CACHE", str(tmp_path / "user-cache"))
    normal = np.asarray(nib.load(str(SAMPLE / "normal_01.nii.gz")).dataobj)
    for k in range(2, normal.shape[2] - 2):
        write_png(tmp_path / "bmad" / "train" / "good" / f"n{k:02d}.png", slice_u8(normal, k))
    case = np.asarray(nib.load(str(SAMPLE / "case_01.nii.gz")).dataobj)
    seg = np.asarray(nib.load(str(SAMPLE / "case_01_seg.nii.gz")).dataobj) > 0
    files = [write_png(tmp_path / "test" / f"case01_{k:02d}.png", slice_u8(case, k)) for k in (7, 13)]
    assert main(["build-bank", str(tmp_path / "bmad"), "--out", str(tmp_path / "bank"), "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    rc, so, err = run(["segment", *map(str, files), "--bank", str(tmp_path / "bank"), "--out", str(out), "--device", "cpu",
                       "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(so)
    assert rep["backbone"]["name"] == "litemedsam" and rep["settings"]["prompt"] == "cog-box"
    rows = read_csv(out / "prompts.csv")
    assert [r["file"] for r in rows] == [f.name for f in files]
    with Image.open(out / f"{files[0].stem}_mask.png") as im:
        mask = np.asarray(im) > 0
    gt = seg[..., 7]
    assert mask.shape == gt.shape == (155, 192)
    x, y = float(rows[0]["x"]), float(rows[0]["y"])
    assert gt[round(y), round(x)], (x, y)  # the prompt centre lies in the lesion
    dice = 2 * (mask & gt).sum() / (mask.sum() + gt.sum())
    assert dice > 0.3, dice
    amap = np.load(out / f"{files[0].stem}_anomaly.npy")
    assert amap.shape == (155, 192) and amap[gt].mean() > amap[~gt].mean()
