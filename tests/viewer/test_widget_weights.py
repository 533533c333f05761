"""The dock widget's weights download and cache folder display (tests/test_weights.py covers the
registry itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_mias_sam.backbones import weights
from weights_fixtures import server, test_registry  # noqa: F401  (fixtures)


@pytest.mark.viewer
def test_widget_downloads_known_weights_and_shows_the_cache_folder(test_registry, tmp_path, make_napari_viewer, qtbot):
    """The dock widget's 'Download and verify' fetches the chosen registry entry in a worker and
    selects its backbone and file; a corrupted download is a notification, nothing is selected."""
    from napari_mias_sam.viewer.widget import MiasSamWidget

    viewer = make_napari_viewer()
    widget = MiasSamWidget(viewer)
    assert str(tmp_path / "cache") in widget.cache_info.value
    widget.weights_choice.value = "test-corrupt"
    job = widget.fetch_weights()
    qtbot.waitUntil(lambda: job.done, timeout=60_000)
    assert "download failed" in widget.status.value  # the reason goes to the message bar
    assert widget.backbone_choice.value == "litemedsam" and list(weights.weights_dir().iterdir()) == []
    widget.weights_choice.value = "test-md5"
    job = widget.fetch_weights()
    qtbot.waitUntil(lambda: job.done, timeout=60_000)
    assert widget.backbone_choice.value == "sam-vit_l"
    assert Path(widget.checkpoint.value) == weights.weights_dir() / "tiny-md5.pth"
