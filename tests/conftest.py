"""Shared fixtures of the napari plugin tests (``tests/viewer/``) and of the tests at large.

The heavy pieces are session-scoped and built once: the LiteMedSAM backbone, a small memory bank
and a small test case cut from the bundled sample (a few slices at full in-plane size, with their
true affines), so the real encoder runs on about ten slices in the whole session. Every test that
runs the pipeline uses a private embedding cache folder (``MIAS_SAM_CACHE``), never the user's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nifti_crops import crop_slices

def pytest_configure(config):
    # Import triton (torch probes for it when torchvision is imported) before any test opens an
    # OpenGL canvas: with Mesa's llvmpipe, importing it afterwards crashes the process (see
    # napari_mias_sam.viewer.widget.avoid_triton_llvm_crash, tested in a subprocess).
    try:
        import triton  # noqa: F401
    except Exception:
        pass


_EXIT_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))
    # Finish Qt's background work and close what napari still holds while the interpreter is whole.
    qt = sys.modules.get("qtpy.QtCore")
    if qt is not None:
        pool = qt.QThreadPool.globalInstance()
        if pool is not None:
            pool.waitForDone(30_000)
    napari = sys.modules.get("napari")
    if napari is not None:
        try:
            napari.Viewer.close_all()
        except Exception:
            pass


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's own exit status once everything is reported.

    A clean-clone CI run (02989ad) passed every test and then died in the interpreter's teardown
    (SIGSEGV, exit 139, after the summary line); the same commit's suite exited 0 in three other
    full runs here, one of them with faulthandler on. The process has by then hosted napari viewers on
    Mesa's llvmpipe (its own LLVM and rasteriser threads) beside triton's LLVM, ONNX Runtime and
    torch thread pools and Dask clusters, and their C++ static destructors run in an order no test
    controls. Nothing of the product runs there: the CLI's own exits are checked by the subprocess
    tests (tests/test_install_wheel.py, tests/test_cli.py). ``MIAS_SAM_TESTS_PLAIN_EXIT=1`` keeps
    the normal interpreter teardown (to look for such a crash with ``python -X faulthandler``).
    """
    if os.environ.get("MIAS_SAM_TESTS_PLAIN_EXIT") == "1" or not _EXIT_STATUS:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])


# The bundled sample (``MIAS_SAM_TEST_SAMPLE_DIR`` points the tests at another copy of it).
SAMPLE_DIR = Path(os.environ.get("MIAS_SAM_TEST_SAMPLE_DIR") or Path(__file__).resolve().parents[1] / "sample_data")


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@pytest.fixture(autouse=True)
def no_prefetch(monkeypatch):
    """The viewer's idle prefetch (the shown slice decoded ahead at the next gamma values) is off
    unless a test turns it on: tests count decodes and time passes (tests/viewer/test_prefetch.py)."""
    monkeypatch.setenv("MIAS_SAM_PREFETCH", "0")


@pytest.fixture(scope="session")
def tilted_affine() -> np.ndarray:
    """Voxel -> RAS mm: anisotropic (0.9, 1.1, 3.5 mm), x flipped, rotated 20 deg in-plane and
    tilted 8 deg, with an offset: nothing about it is diagonal."""
    a = np.eye(4)
    a[:3, :3] = _rotation(0, 8.0) @ _rotation(2, 20.0) @ np.diag([-0.9, 1.1, 3.5])
    a[:3, 3] = [61.5, -20.25, 12.0]
    return a


@pytest.fixture(scope="session")
def save_test_nifti():
    """``save_test_nifti(path, data, affine, qform_code=1, sform_code=2)`` -> path (NIfTI-1)."""

    def write(path: Path, data: np.ndarray, affine: np.ndarray, *, qform_code: int = 1, sform_code: int = 2) -> Path:
        img = nib.Nifti1Image(np.asarray(data), affine)
        img.set_qform(affine, code=qform_code)
        img.set_sform(affine, code=sform_code)
        img.set_data_dtype(np.asarray(data).dtype)
        nib.save(img, str(path))
        return Path(path)

    return write


@pytest.fixture(scope="session")
def mias_cache_dir(tmp_path_factory) -> Path:
    """A private embedding cache for the session (restored afterwards)."""
    path = tmp_path_factory.mktemp("mias-sam-cache")
    old = os.environ.get("MIAS_SAM_CACHE")
    os.environ["MIAS_SAM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MIAS_SAM_CACHE", None)
    else:
        os.environ["MIAS_SAM_CACHE"] = old


@pytest.fixture(scope="session")
def lite_backbone():
    """The real LiteMedSAM backbone on the CPU (bundled weights)."""
    from napari_mias_sam.backbones import load_backbone

    return load_backbone("litemedsam", device="cpu")


@pytest.fixture(scope="session")
def sample_subset(tmp_path_factory) -> dict:
    """A small cut of the bundled sample: case_01 on 3 lesion slices with its ground truth, and
    normal_01/normal_02 on 3 slices each at the same levels (for a quick bank)."""
    needed = ["case_01.nii.gz", "case_01_seg.nii.gz", "normal_01.nii.gz", "normal_02.nii.gz"]
    if not all((SAMPLE_DIR / n).is_file() for n in needed):
        pytest.skip(f"the bundled sample volumes are missing from {SAMPLE_DIR}")
    out = tmp_path_factory.mktemp("sample-subset")
    gt = np.asarray(nib.load(str(SAMPLE_DIR / "case_01_seg.nii.gz")).dataobj) > 0
    per_slice = gt.reshape(-1, gt.shape[2]).sum(axis=0)
    centre = int(np.argmax(per_slice))
    k0 = int(np.clip(centre - 1, 0, gt.shape[2] - 3))
    files = {
        "case": crop_slices(SAMPLE_DIR / "case_01.nii.gz", out / "case_01.nii.gz", k0, k0 + 3),
        "gt": crop_slices(SAMPLE_DIR / "case_01_seg.nii.gz", out / "case_01_seg.nii.gz", k0, k0 + 3),
    }
    normals = []
    for n in ("normal_01", "normal_02"):
        img = nib.load(str(SAMPLE_DIR / f"{n}.nii.gz"))
        # The same world level as the case's slices (the bank volumes start at other heights).
        z_case = (nib.load(str(files["case"])).affine @ [0, 0, 1, 1])[2]
        k = int(round(np.linalg.solve(img.affine, [0, 0, z_case, 1])[2]))
        k = int(np.clip(k - 1, 0, img.shape[2] - 3))
        normals.append(crop_slices(SAMPLE_DIR / f"{n}.nii.gz", out / f"{n}.nii.gz", k, k + 3))
    files["normals"] = normals
    files["lesion_slices"] = [int(i) for i in np.flatnonzero(per_slice[k0 : k0 + 3])]
    return files


@pytest.fixture(scope="session")
def sample_bank(sample_subset, lite_backbone, mias_cache_dir):
    """A memory bank of the 6 normal slices of ``sample_subset`` (LiteMedSAM, MRI preset)."""
    from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS
    from napari_mias_sam.jobs.bank_builds import build_bank_from_files

    return build_bank_from_files(sample_subset["normals"], lite_backbone, preprocessing=PREPROCESS_PRESETS["mri"])


def wait_until(qtbot, condition, timeout: float = 120.0) -> None:
    """Process Qt events until ``condition()`` is true (pytest-qt's waitUntil with a long timeout)."""
    qtbot.waitUntil(condition, timeout=int(timeout * 1000))


def layer_named(viewer, suffix: str):
    """The one layer whose name ends with ``suffix`` (e.g. " mask")."""
    (layer,) = [lay for lay in viewer.layers if lay.name.endswith(suffix)]
    return layer


def settle_live(qtbot, widget) -> None:
    """Wait until the widget's live QA has applied every change (debounce timers and background pass)."""
    wait_until(qtbot, lambda: widget.live is not None and not widget.live.busy)


class LoopLatency:
    """Measures how long the Qt event loop takes to answer: a timer ticks every ``interval_ms``;
    ``max_gap`` is the longest time between two ticks (the viewer's worst freeze)."""

    def __init__(self, interval_ms: int = 50) -> None:
        from qtpy.QtCore import QTimer

        self.interval = interval_ms / 1000.0
        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def __enter__(self) -> "LoopLatency":
        self.ticks = [time.perf_counter()]
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.stop()

    @property
    def max_gap(self) -> float:
        return self.max_gap_between(-np.inf, np.inf)

    def max_gap_between(self, t0: float, t1: float) -> float:
        """Longest gap between ticks that ended within [t0, t1] (perf_counter seconds)."""
        t = np.asarray(self.ticks)
        gaps = np.diff(t)
        keep = (t[1:] >= t0) & (t[1:] <= t1)
        return float(gaps[keep].max()) if keep.any() else float("inf")

    @property
    def n_ticks(self) -> int:
        return len(self.ticks) - 1
