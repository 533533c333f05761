"""The widget shows the CLI's refusals (issue 14) as notifications, from the same checks: a slice
too thin for the patch grid, complex voxels, a damaged bank manifest, an unwritable bank folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import wait_until
from core_fixtures import anatomy_volume, write_nifti
from fakes import FakeBackbone

pytestmark = [
    pytest.mark.usefixtures("mias_cache_dir"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:System theme detection:UserWarning"),
]


@pytest.fixture
def errors(monkeypatch):
    shown: list[str] = []
    import napari_mias_sam.viewer.widget as w

    monkeypatch.setattr(w, "show_error", shown.append)  # every user error goes through the widget's report_error
    return shown


@pytest.fixture
def fake_setup(make_napari_viewer, tmp_path):
    from napari_mias_sam.viewer.widget import MiasSamWidget
    from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
    from napari_mias_sam.jobs.bank_builds import build_bank_from_files

    normals = [write_nifti(tmp_path / f"n{i}.nii.gz", anatomy_volume((48, 48, 3), seed=i) * 200, np.diag([1.0, 1.0, 2.0, 1.0]))
               for i in (1, 2)]
    bb = FakeBackbone()
    bank = build_bank_from_files(normals, bb, preprocessing=PREPROCESS_PRESETS["mri"], layout="mean256")
    viewer = make_napari_viewer()
    widget = MiasSamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MIAS-SAM")
    widget.use_backbone(bb, device="cpu")
    widget.set_bank(bank)
    return viewer, widget, bank


def test_run_refusals_are_the_cli_checks(fake_setup, errors):
    viewer, widget, bank = fake_setup
    cases = [
        (np.random.default_rng(0).random((6, 181, 2)).astype(np.float32), "181 x 2 voxels"),
        (np.random.default_rng(0).random((6, 1, 217)).astype(np.float32), "1 x 217 voxels"),
        (np.full((3, 48, 48), 7.0, np.float32), "same value"),
    ]
    for i, (data, says) in enumerate(cases):
        widget.image.value = viewer.add_image(data, name=f"bad{i}")
        assert widget.run() is None
        assert f"layer 'bad{i}'" in errors[-1] and says in errors[-1], errors[-1]
    try:
        cplx = viewer.add_image((anatomy_volume((48, 48, 3)) * (1 + 1j)).astype(np.complex64), name="cplx")
    except Exception:  # napari versions that refuse complex images never reach the widget
        cplx = None
    if cplx is not None:
        widget.image.value = cplx
        assert widget.run() is None
        assert "layer 'cplx'" in errors[-1] and "complex voxels" in errors[-1]
    assert widget.job is None  # nothing was started
    assert all("Traceback" not in e for e in errors)


def test_bank_refusals_are_notifications(fake_setup, errors, qtbot, tmp_path):
    viewer, widget, bank = fake_setup
    good = tmp_path / "bank"
    bank.save(good)
    bad = tmp_path / "edited"
    shutil.copytree(good, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["preprocessing"]["mode"] = "zscore"
    (bad / "manifest.json").write_text(json.dumps(m))
    widget.bank_path.value = str(bad)
    widget.load_bank()
    wait_until(qtbot, lambda: widget.job.done, timeout=60)
    assert "field 'preprocessing.mode'" in errors[-1] and "zscore" in errors[-1]
    # saving into an immutable (or read-only) folder: refused, nothing written
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode:
            pytest.skip("root without chattr +i")
        undo = lambda: subprocess.run(["chattr", "-i", str(ro)], check=False)  # noqa: E731
    else:
        ro.chmod(0o555)
        undo = lambda: ro.chmod(0o755)  # noqa: E731
    try:
        widget.bank_path.value = str(ro / "bank")
        widget.save_bank()
        wait_until(qtbot, lambda: widget.job.done, timeout=60)
        assert "cannot write there" in errors[-1]
    finally:
        undo()
    assert list(ro.iterdir()) == []
