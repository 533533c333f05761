"""The cross-subject benchmark generator (benchmarks/make_benchmark_data.py): train and test
subjects apart, lesions of every planned kind, lesion-free slices and subjects, true geometry,
and the same files from the same seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "make_benchmark_data.py"
COLIN = Path("/usr/share/mricron/templates/ch2bet.nii.gz")

pytestmark = pytest.mark.skipif(not COLIN.is_file(), reason="needs Debian's mricron-data (Colin27); .ci/run installs it")


def generate(out: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True)
    assert r.returncode == 0, f"the generator failed:\n{r.stderr[-2000:]}"
    return json.loads((out / "benchmark.json").read_text())


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "data"
    return out, generate(out, "--train", "2", "--test", "6")


def test_subjects_are_apart_and_files_pair_up(bench):
    out, m = bench
    assert {t["source"] for t in m["train"]} == {"MNI152-2009a"} and {c["source"] for c in m["test"]} == {"Colin27"}
    assert len(m["train"]) == 2 and len(m["test"]) == 6 and m["seed"] == 20251123
    for c in m["test"]:
        img, lab = nib.load(out / c["image"]), nib.load(out / c["label"])
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), (1, 1, 4))
        seg = np.asarray(lab.dataobj)
        assert set(np.unique(seg)) <= {0, 1} and int(seg.sum()) == c["lesion_voxels"]
        assert np.flatnonzero(seg.any(axis=(0, 1))).tolist() == c["lesion_slices"]


def test_lesions_vary_and_some_slices_and_subjects_are_clean(bench):
    out, m = bench
    lesions = [les for c in m["test"] for les in c["lesions"]]
    assert {les["size"] for les in lesions} == {"small", "medium", "large"}
    assert {les["polarity"] for les in lesions} == {"bright", "dark"}
    assert all((les["contrast"] > 0) == (les["polarity"] == "bright") for les in lesions)
    assert any(not c["lesions"] and c["lesion_voxels"] == 0 for c in m["test"])  # a lesion-free subject
    for c in m["test"]:
        if c["lesions"]:  # lesion slices and lesion-free slices in the same volume
            assert 0 < len(c["lesion_slices"]) < c["slices"]
    # a bright lesion is brighter than the brain around it, a dark one darker
    for c in m["test"]:
        if len(c["lesions"]) != 1:
            continue
        img = np.asarray(nib.load(out / c["image"]).dataobj, dtype=np.float32)
        seg = np.asarray(nib.load(out / c["label"]).dataobj) > 0
        brain = (img > 0) & ~seg
        inside, around = float(np.median(img[seg])), float(np.median(img[brain]))
        assert (inside > around) == (c["lesions"][0]["polarity"] == "bright")


def test_same_seed_same_files_and_no_overwrite(bench, tmp_path):
    out, _ = bench
    again = tmp_path / "again"
    generate(again, "--train", "2", "--test", "6")
    for rel in ("train/normal_02.nii.gz", "test/images/case_02.nii.gz", "test/labels/case_05.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(again / rel).dataobj), np.asarray(nib.load(out / rel).dataobj))
    before = (again / "benchmark.json").read_bytes()
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(again)], capture_output=True, text=True)
    assert r.returncode != 0 and "already holds a benchmark" in r.stderr
    assert (again / "benchmark.json").read_bytes() == before
