"""The one run path (jobs/run.py) that ``mias-sam segment`` and the widget's Run share: every check
before any work and each once, an input read once, the ROI applied before the checks, the backbone
checked against the bank once per call, results equal to ``segment_volume``'s."""

from __future__ import annotations

import numpy as np
import pytest

import napari_mias_sam.bank.store as store
import napari_mias_sam.jobs.run as run_mod
from fakes import FakeBackbone
from core_fixtures import anatomy_volume, write_nifti
from napari_mias_sam.bank import load_bank
from napari_mias_sam.core.errors import BankMismatchError, InputError
from napari_mias_sam.data.volumes import Volume, load_volume
from napari_mias_sam.jobs.bank_builds import build_bank_from_files
from napari_mias_sam.jobs.run import CheckedDevice, RunInput, check_machine, prepare_run, run
from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
from napari_mias_sam.pipeline.segment import segment_volume
from napari_mias_sam.pipeline.settings import SegmentSettings

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_path")
    normals = [write_nifti(root / f"n{i}.nii.gz", anatomy_volume((48, 48, 4), seed=i) * 300, AFFINE) for i in (1, 2)]
    bank = build_bank_from_files(normals, FakeBackbone(), preprocessing=PREPROCESS_PRESETS["mri"], layout="mean256")
    bank.save(root / "bank")
    data = anatomy_volume((48, 48, 4), seed=3, blob={"centre": (30, 20), "radius": 5, "value": 1.0, "slices": [1, 2]}) * 300
    case = write_nifti(root / "case.nii.gz", data, AFFINE)
    return {"bank": load_bank(root / "bank"), "case": case}


def _counting_input(path, reads: list) -> RunInput:
    def read():
        reads.append(path)
        return load_volume(path), None

    return RunInput(str(path), read)


def test_one_volume_is_read_once_checked_once_and_segmented_as_segment_volume_does(world, monkeypatch):
    reads, compatible = [], []
    real = store.check_compatible
    monkeypatch.setattr("napari_mias_sam.pipeline.segment.check_compatible", lambda *a, **k: (compatible.append(1), real(*a, **k)))
    settings = SegmentSettings(prompt="cog-point")
    prepared = prepare_run(world["bank"], [_counting_input(world["case"], reads)], settings, device="cpu")
    assert reads == [world["case"]] and prepared.inputs[0].n_slices == 4 and prepared.backbone == "fake"
    assert isinstance(prepared.device, CheckedDevice) and prepared.precision == "fp32"
    setup = prepared.start(FakeBackbone())
    res, labels = run(prepared, setup, prepared.inputs[0])
    assert reads == [world["case"]] and compatible == [1] and labels is None  # the preflight's copy, handed over
    again = segment_volume(load_volume(world["case"]), world["bank"], FakeBackbone(), settings)
    assert np.array_equal(res.logits, again.logits) and np.array_equal(res.maps, again.maps)
    assert res.settings == again.settings and res.prompts == again.prompts
    # a second run of the same input reads it again (the copy was handed over once)
    run(prepared, setup, prepared.inputs[0])
    assert len(reads) == 2


def test_every_input_is_checked_before_any_work(world, tmp_path):
    bad = write_nifti(tmp_path / "bad.nii.gz", np.full((48, 48, 4), 7.0, np.float32), AFFINE)
    with pytest.raises(InputError, match="bad.nii.gz.*same value"):
        prepare_run(world["bank"], [_counting_input(world["case"], []), _counting_input(bad, [])], SegmentSettings(), device="cpu")
    with pytest.raises(InputError, match="not a device"):
        prepare_run(world["bank"], [_counting_input(world["case"], [])], SegmentSettings(), device="gpu0")
    with pytest.raises(InputError, match="fp16"):
        check_machine("cpu", "fp16")
    with pytest.raises(InputError, match="--k 100000"):
        prepare_run(world["bank"], [_counting_input(world["case"], [])], SegmentSettings(k=100000), device="cpu")
    reads = []
    with pytest.raises(BankMismatchError, match="built with fake but the selected backbone is litemedsam"):
        prepare_run(world["bank"], [_counting_input(world["case"], reads)], SegmentSettings(), backbone="litemedsam", device="cpu")
    assert reads == []  # refused before reading anything


def test_the_roi_is_applied_before_the_checks(world, monkeypatch):
    """The widget's Run masked the volume to the bank's ROI after its checks, the CLI before: now
    both before (the checks see what the run will segment)."""
    seen = []
    masked = Volume(np.zeros((48, 48, 4), np.float32), AFFINE)
    monkeypatch.setattr(run_mod, "roi_for_bank", lambda image, manifest, **kw: (seen.append("roi"), masked)[1])
    monkeypatch.setattr(run_mod, "check_volume_for_bank", lambda image, *a: (seen.append(image is masked), 4)[1])
    prepared = prepare_run(world["bank"], [_counting_input(world["case"], [])], SegmentSettings(), device="cpu")
    assert seen == ["roi", True] and prepared.inputs[0].take(world["bank"])[0] is masked
