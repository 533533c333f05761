"""Make the README screenshot: the bundled sample in a real napari viewer after a MIAS-SAM run.

Run it under a virtual display on a headless machine (no GPU, no download needed)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot.py            # -> docs/images/viewer.png
    xvfb-run -a python docs/screenshot.py --bank mias-sam-demo/bank              # reuse a bank

It opens ``case_01`` and its ground truth with the plugin's reader, docks the MIAS-SAM widget,
builds the memory bank from the bundled normal volumes through the widget (or loads ``--bank``),
runs the widget on the case, picks the ground truth for the live Dice and saves a screenshot of
the whole window with the anomaly map, the CoG points and the mask over the volume. The bank is
kept in the user cache folder (keyed by the sample normals' content), so a second run only segments.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _wait(app, condition, timeout: float = 3600.0, what: str = "") -> None:
    t0 = time.perf_counter()
    last = -1
    while not condition():
        app.processEvents()
        time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        if int(elapsed) // 15 != last:
            last = int(elapsed) // 15
            print(f"  {what}... {elapsed:.0f} s", flush=True)
        if elapsed > timeout:
            raise TimeoutError(what)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "images" / "viewer.png")
    ap.add_argument("--sample", type=Path, default=None, help="sample folder (default: the bundled one)")
    ap.add_argument("--bank", type=Path, default=None, help="an existing bank folder (default: build one and cache it)")
    ap.add_argument("--size", default="1760x1040", help="window size WxH")
    a = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend")
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_mias_sam.paths import cache_dir
    from napari_mias_sam.demo import sample_files

    files = sample_files(a.sample)
    viewer = napari.Viewer(title="napari-mias-sam", show=True)
    app = QApplication.instance()
    w, h = (int(v) for v in a.size.split("x"))
    viewer.window.resize(w, h)
    (image,) = viewer.open(str(files["case"]), plugin="napari-mias-sam")
    (gt,) = viewer.open(str(files["gt"]), plugin="napari-mias-sam")
    gt.name = "case_01 ground truth"
    _, widget = viewer.window.add_plugin_dock_widget("napari-mias-sam", "MIAS-SAM")
    widget.device.value = "cpu"

    import hashlib

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files["normals"])).hexdigest()[:12]
    bank_dir = a.bank or (cache_dir() / "banks" / f"sample-litemedsam-{digest}")  # keyed by the sample's content
    if (bank_dir / "manifest.json").is_file():
        widget.bank_path.value = bank_dir
        widget.load_bank()
        _wait(app, lambda: widget.job.done, what="loading the bank")
    else:
        widget.normal_files.value = tuple(files["normals"])
        widget.build_bank()
        _wait(app, lambda: widget.job.done, what="building the bank from the sample normals")
        if widget.bank is None:
            raise SystemExit("building the bank failed: " + widget.status.value)
        widget.bank_path.value = bank_dir
        widget.save_bank()
        _wait(app, lambda: widget.job.done, what="saving the bank")
    if widget.bank is None:
        raise SystemExit("no memory bank: " + widget.status.value)

    widget.image.value = image
    t0 = time.perf_counter()
    job = widget.run()
    _wait(app, lambda: job.done, what="running MIAS-SAM")
    print(f"run: {time.perf_counter() - t0:.1f} s; {widget.status.value}")
    live = widget.live
    if live is None:
        raise SystemExit("the run failed: " + widget.status.value)

    widget.gt.value = gt
    # The ground truth as a cyan outline on top of the filled mask.
    from napari.utils.colormaps import DirectLabelColormap

    gt.colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "cyan"})
    gt.contour = 2
    gt.opacity = 1.0
    viewer.layers.move(viewer.layers.index(gt), len(viewer.layers))
    # Show the slice with the largest lesion.
    ax = live.session.display_axis
    g = np.moveaxis(np.asarray(gt.data) != 0, ax, 0)
    s = int(np.argmax(g.reshape(g.shape[0], -1).sum(axis=1)))
    live.jump_to(s)
    viewer.layers.selection.active = live.layers["points"]
    viewer.reset_view()
    widget.scroll.ensureWidgetVisible(widget.next_btn.native)  # show the run, Dice and profile
    for _ in range(30):
        app.processEvents()
        time.sleep(0.03)
    for w in app.allWidgets():  # dismiss notification toasts (e.g. napari's PyQt5 deprecation notice)
        if type(w).__name__ == "NapariQtNotification":
            w.close()
    for _ in range(10):
        app.processEvents()
        time.sleep(0.03)
    print(widget.dice_info.value.replace("\n", " | "))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(a.out), canvas_only=False, flash=False)
    print(f"wrote {a.out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
