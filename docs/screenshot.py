"""Make the README screenshot and the QA gallery, and print what the viewer's steps cost.

Run it under a virtual display on a headless machine (no GPU, no download needed)::

    xvfb-run -a -s "-screen 0 1920x1080x24" python docs/screenshot.py                 # -> docs/images/
    xvfb-run -a -s "-screen 0 1920x1080x24" python docs/screenshot.py --fresh-embeddings

It drives the real widget as a user does: opens ``case_01`` and its ground truth with the plugin's
reader, docks MIAS-SAM from the plugin menu, builds the memory bank from the bundled normal
volumes through the widget (kept in the user cache folder, keyed by the normals' content, so a
second call only loads it) or loads ``--bank``, presses Run, picks the ground truth, then:

* ``docs/images/viewer.png`` (README) and ``qa-1-run.png``: the run done, the slice with the largest lesion;
* ``qa-2-gamma.png``: gamma 2 (wider boxes, the prompt pulled towards weaker responses);
* ``qa-3-moved-point.png``: gamma back to 5 and the CoG point dragged onto the lesion (orange);
* ``qa-4-fp-fn.png``: the false-positive / false-negative outlines;
* ``qa-5-review.png``: every slice's prompt reviewed as the keys do (``r`` on slices the ground
  truth shows lesion-free, ``a`` on the others, the dragged one stays corrected), the dock's
  *Review prompts* section in view; the results are saved and summarised with ``mias-sam qa-report``.

It prints the wall time of the first run (``--fresh-embeddings``: with an empty embedding cache, so
the encoder runs), of a rerun with the same bank and k (the anomaly maps are reused: only the
prompts and the decoder run) and of a live update (gamma: the current slice, then every slice).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _wait(app, condition, timeout: float = 3600.0, what: str = "") -> float:
    """Process Qt events until ``condition()``; returns the seconds it took."""
    t0 = time.perf_counter()
    last = -1
    while not condition():
        app.processEvents()
        time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        if what and int(elapsed) // 15 != last:
            last = int(elapsed) // 15
            print(f"  {what}... {elapsed:.0f} s", flush=True)
        if elapsed > timeout:
            raise TimeoutError(what)
    return time.perf_counter() - t0


def _pump(app, seconds: float = 0.6) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def _dismiss_toasts(app) -> None:
    for w in app.allWidgets():  # notification toasts would cover the canvas
        if type(w).__name__ == "NapariQtNotification":
            w.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "images", help="folder for viewer.png and the qa-*.png gallery")
    ap.add_argument("--sample", type=Path, default=None, help="sample folder (default: the bundled one)")
    ap.add_argument("--bank", type=Path, default=None, help="an existing bank folder (default: build one and cache it)")
    ap.add_argument("--size", default="1920x1080", help="window size WxH (default: a 1080p screen)")
    ap.add_argument("--fresh-embeddings", action="store_true",
                    help="an empty embedding cache for the runs, so the first run encodes every slice")
    a = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend")
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_mias_sam.core.paths import cache_dir
    from napari_mias_sam.jobs.demo import sample_files

    files = sample_files(a.sample)
    viewer = napari.Viewer(title="napari-mias-sam", show=True)
    app = QApplication.instance()
    w, h = (int(v) for v in a.size.split("x"))
    viewer.window.resize(w, h)
    (image,) = viewer.open(str(files["case"]), plugin="napari-mias-sam")
    (gt,) = viewer.open(str(files["gt"]), plugin="napari-mias-sam")
    gt.name = "case_01 GT"
    _, widget = viewer.window.add_plugin_dock_widget("napari-mias-sam", "MIAS-SAM")
    widget.device.value = "cpu"

    import hashlib

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files["normals"])).hexdigest()[:12]
    bank_dir = a.bank or (cache_dir() / "banks" / f"sample-litemedsam-{digest}")  # keyed by the sample's content
    if (bank_dir / "manifest.json").is_file():
        widget.bank_path.value = bank_dir
        widget.load_btn.native.click()
        _wait(app, lambda: widget.job.done, what="loading the bank")
    else:
        widget.sample_normals_btn.native.click()
        widget.build_btn.native.click()
        _wait(app, lambda: widget.job.done, what="building the bank from the sample normals")
        if widget.bank is None:
            raise SystemExit("building the bank failed: " + widget.message.text())
        widget.bank_path.value = bank_dir
        widget.save_btn.native.click()
        _wait(app, lambda: widget.job.done, what="saving the bank")
    if widget.bank is None:
        raise SystemExit("no memory bank: " + widget.message.text())
    if a.fresh_embeddings:  # a new cache folder without embeddings, sharing the exported ONNX models
        fresh = Path(tempfile.mkdtemp(prefix="mias-sam-fresh-"))
        (cache_dir() / "onnx").mkdir(exist_ok=True)
        (fresh / "onnx").symlink_to(cache_dir() / "onnx", target_is_directory=True)
        os.environ["MIAS_SAM_CACHE"] = str(fresh)

    times: dict[str, float] = {}
    widget.image.value = image
    widget.run_btn.native.click()
    times["first run"] = _wait(app, lambda: widget.job.done, what="running MIAS-SAM")
    live = widget.live
    if live is None:
        raise SystemExit("the run failed: " + widget.message.text())
    first_cached = live.session.result.encoded.from_cache
    print("  pipeline stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in live.session.result.timings.items()))
    print(f"first run: {times['first run']:.1f} s ({'embeddings from the cache' if first_cached else 'encoder ran'}); "
          f"{widget.status.value}")

    widget.gt.value = gt  # as picking it in "ground truth" does
    ax = live.session.display_axis
    g = np.moveaxis(np.asarray(gt.data) != 0, ax, 0)
    s = int(np.argmax(g.reshape(g.shape[0], -1).sum(axis=1)))  # the slice with the largest lesion
    live.jump_to(s)
    viewer.reset_view()
    _pump(app)
    a.out.mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> None:
        _pump(app, 0.4)
        _dismiss_toasts(app)
        _pump(app, 0.2)
        viewer.screenshot(str(a.out / name), canvas_only=False, flash=False)
        print(f"wrote {a.out / name}: {widget.dice_info.value.splitlines()[0]}; {widget.counts_info.value}")

    shot("viewer.png")
    shot("qa-1-run.png")

    # A rerun with the same bank and k: the anomaly maps are reused.
    widget.run_btn.native.click()
    times["rerun, maps reused"] = _wait(app, lambda: widget.job.done, what="rerun")
    live = widget.live
    print(f"rerun: {times['rerun, maps reused']:.1f} s (maps reused: {live.session.result.maps_reused}); {widget.status.value}")
    print("  pipeline stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in live.session.result.timings.items()))
    _wait(app, lambda: not live.busy)
    live.jump_to(s)

    # A live update: gamma 2 through the slider.
    live.updated.clear()  # the slices this update shows, in order (the current slice first)
    t0 = time.perf_counter()
    widget.gamma.value = 2.0
    _wait(app, lambda: live.updated[:1] == [s])
    times["live update, current slice"] = time.perf_counter() - t0
    _wait(app, lambda: not live.busy)
    times["live update, all slices"] = time.perf_counter() - t0
    print(f"live update (gamma 5 -> 2): current slice {times['live update, current slice']:.2f} s, "
          f"all {live.session.n_slices} slices {times['live update, all slices']:.1f} s")
    shot("qa-2-gamma.png")

    # Gamma back to 5, then drag the CoG point of this slice onto the lesion's centre.
    widget.gamma.value = 5.0
    _wait(app, lambda: not live.busy)
    before = widget.dice_info.value.splitlines()[0]
    points = live.layers["points"]
    rows = np.flatnonzero(points.features["slice"].to_numpy() == s)
    lesion = np.argwhere(np.take(np.asarray(gt.data) != 0, s, axis=ax))
    if len(rows) and len(lesion):
        # One point per region piece: drag the one nearest the lesion onto the lesion's centre.
        inplane = [d for d in range(3) if d != ax]
        centre = lesion.mean(axis=0)
        row = rows[int(np.argmin([np.linalg.norm(points.data[r][inplane] - centre) for r in rows]))]
        target = points.data[row].copy()
        target[inplane] = centre
        data = points.data.copy()
        data[row] = target
        points.data = data
        _wait(app, lambda: not live.busy)
        print(f"moved point on slice {s}: {before} -> {widget.dice_info.value.splitlines()[0]}")
    viewer.layers.selection.active = points
    shot("qa-3-moved-point.png")

    widget.show_errors.native.click()
    _pump(app)
    shot("qa-4-fp-fn.png")

    # Review every prompt as the keys on the CoG layer do (r / a, n to the next pending slice).
    widget.show_errors.native.click()
    _pump(app)
    ses = live.session
    lesion_slices = set(np.flatnonzero(g.reshape(g.shape[0], -1).any(axis=1)).tolist())
    t0 = time.perf_counter()
    for t in range(ses.n_slices):
        if ses.status(t) == "pending":
            live.jump_to(t)
            live.review.act("accept" if t in lesion_slices else "reject")
    _wait(app, lambda: not live.busy)
    times["review by keys (acts, no think time)"] = time.perf_counter() - t0
    live.jump_to(s)
    viewer.layers.selection.active = points
    widget.scroll.verticalScrollBar().setValue(widget.scroll.verticalScrollBar().maximum())
    print(f"review: {widget.review_info.value.splitlines()[0]}")
    shot("qa-5-review.png")
    results = Path(tempfile.mkdtemp(prefix="mias-sam-review-"))
    widget.results_folder.value = results
    widget.save_results_btn.native.click()
    from napari_mias_sam.cli.commands import main as cli

    cli(["qa-report", str(results)])

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nmeasured {stamp} on {platform.machine()} {platform.processor() or ''} with {os.cpu_count()} CPUs "
          f"({'fresh embedding cache' if a.fresh_embeddings else 'embedding cache as found'}):")
    for k, v in times.items():
        print(f"  {k}: {v:.2f} s")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
