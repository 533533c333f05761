"""The npe2 manifest and what napari builds from it: contributions validated on the installed
package, the dock widget from the Plugins menu and under Layers > Segment, the sample data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PLUGIN = "napari-mias-sam"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:System theme detection:UserWarning")


def test_manifest_validates_on_the_installed_package():
    import npe2

    mf = npe2.PluginManifest.from_distribution(PLUGIN)
    assert mf.name == PLUGIN
    mf.validate_imports()  # every python_name imports and resolves
    c = mf.contributions
    assert {r.command for r in c.readers} == {f"{PLUGIN}.get_reader"}
    assert set(c.readers[0].filename_patterns) == {"*.nii", "*.nii.gz", "*_qa.csv"}  # + a prompt review
    assert {tuple(w.layer_types) for w in c.writers} == {("labels",), ("image",), ("points",)}
    assert {s.key for s in c.sample_data} >= {"case_01"}
    assert [w.display_name for w in c.widgets] == ["MIAS-SAM"]
    assert [m.command for m in c.menus["napari/layers/segment"]] == [f"{PLUGIN}.widget"]
    # The same file as in the source tree, shipped as package data.
    src = Path(__file__).resolve().parents[2] / "src" / "napari_mias_sam" / "napari.yaml"
    assert npe2.PluginManifest.from_file(src).name == PLUGIN


def test_npe2_validate_command():
    from npe2.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["validate", PLUGIN, "--imports"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


@pytest.mark.filterwarnings("error:Private attribute access")
def test_widget_from_plugins_menu_works_through_the_viewer_proxy(make_napari_viewer, qtbot):
    """napari hands plugin widgets a proxy of the viewer that warns on private attribute access;
    the widget's live QA must work through it without touching private attributes."""
    from test_live import _result, disc_backbone

    from napari_mias_sam.viewer.widget import MiasSamWidget

    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "MIAS-SAM")
    assert isinstance(widget, MiasSamWidget)
    assert getattr(widget.viewer, "__wrapped__", widget.viewer) is viewer
    image = viewer.add_image(np.random.default_rng(0).random((4, 30, 40)).astype(np.float32), name="vol")
    # A result with the pipeline slicing along data axis 0 (fast fake decoder).
    result = _result(axis=0, shape=(4, 30, 40))
    live = widget.show_result(result, widget.viewer.layers["vol"], disc_backbone())
    names = [layer.name for layer in viewer.layers]
    assert names == ["vol", "vol anomaly", "vol mask", "vol prompt box", "vol CoG"]
    before = viewer.layers["vol CoG"].data.copy()
    widget.gamma.value = 1.0
    qtbot.waitUntil(lambda: not live.busy, timeout=30_000)
    assert np.abs(viewer.layers["vol CoG"].data - before).max() > 1.0
    assert image.name == "vol"


def test_widget_listed_under_layers_segment(make_napari_viewer):
    from napari._app_model import get_app_model

    make_napari_viewer()
    app = get_app_model()
    items = app.menus.get_menu("napari/layers/segment")
    ids = [getattr(getattr(i, "command", None), "id", "") for i in items]
    assert any(PLUGIN in i for i in ids), ids


def test_sample_data_opens_with_ground_truth_as_labels(make_napari_viewer):
    from napari_mias_sam.core.paths import sample_data_dir

    if not (sample_data_dir() / "case_01.nii.gz").is_file():
        pytest.skip("bundled sample volumes missing")
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "case_01")
    kinds = {layer.name: type(layer).__name__ for layer in layers}
    assert kinds == {"case_01": "Image", "case_01 ground truth": "Labels"}
    image, gt = viewer.layers["case_01"], viewer.layers["case_01 ground truth"]
    assert image.data.shape == gt.data.shape
    np.testing.assert_allclose(image.affine.affine_matrix, gt.affine.affine_matrix)
    assert gt.data.max() >= 1


def test_backbone_loads_after_the_canvas_exists(tmp_path):
    """In a fresh process (nothing imported early): open a viewer (on a virtual display its
    OpenGL is Mesa's llvmpipe), dock the widget, then load LiteMedSAM as the widget does. Without
    the triton guard this crashes the interpreter with a segmentation fault."""
    import subprocess
    import sys

    code = (
        "import napari\n"
        "v = napari.Viewer(show=False)\n"
        "dock, w = v.window.add_plugin_dock_widget('napari-mias-sam', 'MIAS-SAM')\n"
        "bb = w.get_backbone(('litemedsam', None, 'cpu', 'standard'), lambda *a: None)\n"
        "print('loaded', bb.name)\n"
        "v.close()\n"
    )
    env = {**__import__("os").environ, "MIAS_SAM_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded litemedsam" in proc.stdout
