"""How long a user waits in the real napari viewer: live updates, a dragged point, a rerun.

Run it under a virtual display (software OpenGL) from the repository root::

    xvfb-run -a -s "-screen 0 1920x1080x24" python benchmarks/viewer_latency.py
    xvfb-run -a -s "-screen 0 1920x1080x24" python benchmarks/viewer_latency.py --tall 155   # + a 155-slice volume

It drives the dock as a user does: opens the bundled ``case_01`` and its ground truth with the
plugin's reader, docks MIAS-SAM, loads a memory bank (``--bank``, or one built from the bundled
normal volumes through the widget and kept in the user cache folder, keyed by their content),
presses Run, picks the ground truth, goes to the slice with the largest lesion, then times, each
``--repeats`` times:

* **rerun, maps reused**: Run pressed again with the same bank and k, until the new result's
  layers are drawn;
* **gamma / mask / prompt change**: the dock's control set to a new value, until the canvas has
  drawn the current slice's new mask (*current slice*) and until every slice is up to date and
  drawn (*all slices*); gamma is timed with the volume's default prompt and with ``cog-box``
  (whose prompt gamma moves);
* **dragged point**: the current slice's CoG point dragged with the mouse (press, moves, release
  through napari's mouse bindings of the Points layer), from the release until the canvas has
  drawn that slice's new mask;
* **gamma change by one slider step (prefetched)**: with the viewer's prefetch on (its default),
  after waiting until the dock is idle and the shown slice was decoded ahead at the next gammas
  (as a user who paused), gamma moved by one slider step (0.5) to a value not used before, with
  the volume's default prompt and with ``cog-box``; and gamma **jumped by 4 steps** (2.0) at once
  the same way (within the prefetch's +-3.0); the script also counts the changes whose shown slice
  decoded nothing (served from the decoder's cache);
* **mask change right after a gamma jump, while the prefetch runs**: gamma jumped to a value not
  used before, and as soon as that pass is done (the prefetch of the new gamma's neighbours under
  way), the mask changed (every change stops the prefetch); and the same with the prefetch off
  (the control: what a mask change costs right after a gamma pass anyway).

The figures above the last are **cold**: they run with the prefetch off (``MIAS_SAM_PREFETCH=0``),
and gamma jumps to values not used before, so the decoder cannot remember them.

"Drawn" is the end of the first canvas paint after the widget applied the update (vispy's draw
event, measured after the scene has rendered). With ``--tall N`` the same live updates are timed
on an N-slice volume made from ``case_01`` by linear interpolation along its slice axis (written to
the cache folder; its first run encodes N slices once, later runs read the embedding and
nearest-neighbour caches). Prints min and median of each figure, with the machine, the load
average and the date. Nothing here is a test: the figures are for docs/performance.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# -- waiting on Qt --------------------------------------------------------------------------------
class Frames:
    """Timestamps of the canvas paints (after the scene rendered)."""

    def __init__(self, viewer) -> None:
        canvas = viewer.window._qt_viewer.canvas._scene_canvas
        self.times: list[float] = []
        canvas.events.draw.connect(self._drawn, position="last")

    def _drawn(self, _event=None) -> None:
        self.times.append(time.perf_counter())

    def first_after(self, t: float) -> float | None:
        for v in self.times:
            if v >= t:
                return v
        return None


def pump(app, until, timeout: float = 600.0, what: str = "") -> None:
    """Process Qt events until ``until()`` is true, as the application's event loop would,
    deferred deletions included (``processEvents`` alone leaves them: napari's "in progress"
    spinner, stopped when a finished progress bar is deleted, would then animate for ever and
    repaint the window ~18 times a second, which no user's viewer does)."""
    from qtpy.QtCore import QEvent, QEventLoop

    t0 = time.perf_counter()
    while not until():
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 5)
        app.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        time.sleep(0.0005)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(what or "waiting for the viewer")


def settle(app, seconds: float = 0.3) -> None:
    t0 = time.perf_counter()
    pump(app, lambda: time.perf_counter() - t0 > seconds)


class UpdateLog:
    """When the live controller applied each slice's update to the layers, and when its pass
    ended (wraps its two slots)."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self.done: float | None = None
        self.live = None

    def attach(self, live) -> None:
        if live is self.live:
            return
        self.live = live
        on_update_slot, on_done_slot = live._on_update, live._on_done

        def on_update(gen, upd):
            on_update_slot(gen, upd)
            if gen == live.session.generation:
                self.times.setdefault(int(upd.s), time.perf_counter())

        def on_done(gen):
            on_done_slot(gen)
            if gen == live.session.generation:
                self.done = time.perf_counter()

        live._on_update, live._on_done = on_update, on_done

    def clear(self) -> None:
        self.times = {}
        self.done = None


def stats(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"min {min(ms):7.0f} ms   median {statistics.median(ms):7.0f} ms   (n={len(ms)})"


# -- the sample ----------------------------------------------------------------------------------
def tall_volume(files: dict, n: int, out: Path) -> tuple[Path, Path]:
    """``case_01`` and its ground truth resampled to ``n`` slices along the slice axis (linear for
    the image, nearest for the labels), with the affine that keeps them in place."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"case_01_tall{n}.nii.gz", out / f"case_01_tall{n}_seg.nii.gz")
    if all(p.is_file() for p in paths):
        return paths
    for src, dst, order in ((files["case"], paths[0], 1), (files["gt"], paths[1], 0)):
        img = nib.load(str(src))
        data = np.asarray(img.dataobj)
        z = data.shape[2]
        f = (z - 1) / (n - 1)
        coords = np.arange(n) * f
        res = ndimage.map_coordinates(data.astype(np.float32), np.meshgrid(
            np.arange(data.shape[0]), np.arange(data.shape[1]), coords, indexing="ij"), order=order)
        aff = img.affine.copy()
        aff[:3, 2] *= f
        dtype = data.dtype
        arr = np.rint(res).astype(dtype) if dtype.kind in "iu" else res.astype(dtype)
        new = nib.Nifti1Image(arr, aff)
        new.set_qform(aff, code=int(img.header["qform_code"]) or 1)
        new.set_sform(aff, code=int(img.header["sform_code"]) or 1)
        nib.save(new, str(dst))
    return paths


# -- one volume ------------------------------------------------------------------------------------
class Bench:
    def __init__(self, viewer, widget, app, repeats: int) -> None:
        self.viewer, self.w, self.app, self.repeats = viewer, widget, app, repeats
        self.frames = Frames(viewer)
        self.log = UpdateLog()
        self.results: dict[str, list[float]] = {}
        self.served: dict[str, list[bool]] = {}  # prefetched changes: the shown slice decoded nothing

    def add(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)

    def open_case(self, image_path: Path, gt_path: Path):
        for lay in list(self.viewer.layers):
            self.viewer.layers.remove(lay)
        (image,) = self.viewer.open(str(image_path), plugin="napari-mias-sam")
        (gt,) = self.viewer.open(str(gt_path), plugin="napari-mias-sam")
        gt.name = f"{image.name} GT"
        self.w.reset_choices()
        return image, gt

    def run(self, image, what: str) -> float:
        """Press Run; seconds until the result's layers are drawn."""
        w = self.w
        w.image.value = image
        shown: list[float] = []
        show_result = w.show_result

        def timed_show(*args, **kwargs):  # the result's layers are set when this returns
            try:
                return show_result(*args, **kwargs)
            finally:
                shown.append(time.perf_counter())

        w.show_result = timed_show
        try:
            t0 = time.perf_counter()
            w.run_btn.native.click()
            pump(self.app, lambda: w.job.done, timeout=3600, what=what)
        finally:
            del w.show_result
        live = w.live
        if live is None or not shown:
            raise SystemExit(f"{what} failed: {w.message.text()}")
        pump(self.app, lambda: not live.busy, what=what)
        t_set = shown[-1]
        pump(self.app, lambda: self.frames.first_after(t_set) is not None, timeout=5, what=f"{what}: a draw")
        return self.frames.first_after(t_set) - t0

    def lesion_slice(self, gt) -> int:
        import numpy as np

        live = self.w.live
        g = np.moveaxis(np.asarray(gt.data) != 0, live.session.display_axis, 0)
        return int(np.argmax(g.reshape(g.shape[0], -1).sum(axis=1)))

    def shown(self, s: int, what: str) -> float:
        """When slice ``s``'s update was on screen: the end of the first paint after the widget
        applied it (or the update itself when nothing changed on screen, so nothing was painted)."""
        pump(self.app, lambda: s in self.log.times, timeout=120, what=what)
        t = self.log.times[s]
        pump(self.app, lambda: self.frames.first_after(t) is not None or time.perf_counter() - t > 0.5)
        return self.frames.first_after(t) or t

    def change(self, key: str, setter, s: int) -> None:
        """Apply one change through ``setter()``; record current-slice and all-slice latencies."""
        live = self.w.live
        self.log.attach(live)
        self.log.clear()
        t0 = time.perf_counter()
        setter()
        self.add(f"{key}: current slice", self.shown(s, key) - t0)
        pump(self.app, lambda: self.log.done is not None, timeout=600, what=key)
        done = self.log.done
        pump(self.app, lambda: self.frames.first_after(done) is not None or time.perf_counter() - done > 0.5)
        drawn = self.frames.first_after(done)
        self.add(f"{key}: all {live.session.n_slices} slices", (drawn or done) - t0)
        pump(self.app, lambda: not live.busy, timeout=600, what=key)  # the QA columns too, before the next change
        settle(self.app, 0.2)

    def drag_point(self, s: int, shift_px: float) -> None:
        """Drag slice ``s``'s CoG point by ``shift_px`` pixels (of the displayed plane) with the
        mouse; record release -> that slice's new mask drawn."""
        import numpy as np
        from napari.utils._proxies import ReadOnlyWrapper
        from napari.utils.events import Event
        from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

        live = self.w.live
        self.log.attach(live)
        pts = live.layers["points"]
        self.viewer.layers.selection.active = pts
        pts.mode = "select"
        rows = np.flatnonzero(pts.features["slice"].to_numpy() == s)
        if not len(rows):  # several with the regions prompt (one per region piece): the first, the most anomalous
            raise SystemExit(f"slice {s} has no CoG point; cannot drag")
        start = np.asarray(pts.data_to_world(pts.data[rows[0]]), dtype=float)
        disp = list(self.viewer.dims.displayed)
        end = start.copy()
        end[disp[-1]] += shift_px * abs(float(np.asarray(pts.scale)[-1]) or 1.0)

        def event(kind: str, pos):
            return ReadOnlyWrapper(Event(type_name=kind, is_dragging=kind == "mouse_move", modifiers=[], position=tuple(pos),
                                         view_direction=None, dims_displayed=disp, dims_point=None, pos=np.zeros(2)),
                                   exceptions=("handled",))

        mouse_press_callbacks(pts, event("mouse_press", start))
        for f in np.linspace(0.2, 1.0, 5):
            mouse_move_callbacks(pts, event("mouse_move", start + f * (end - start)))
            self.app.processEvents()
        self.log.clear()
        t0 = time.perf_counter()
        mouse_release_callbacks(pts, event("mouse_release", end))
        self.add("dragged point: release -> its mask drawn", self.shown(s, "dragged point") - t0)
        pump(self.app, lambda: not live.busy, timeout=120)
        if s not in live.session.overrides:
            raise SystemExit("the drag did not move the CoG point (no override recorded)")
        settle(self.app, 0.2)

    def set_prefetch(self, on: bool) -> None:
        """The viewer's prefetch on or off (this controller and the ones later runs make)."""
        os.environ["MIAS_SAM_PREFETCH"] = "1" if on else "0"
        live = self.w.live
        live.prefetch = on
        if not on:
            live.stop_prefetch()
        else:
            live.on_slice_changed()  # as the dock does after a pass: the prefetch starts when idle
        pump(self.app, lambda: not live.prefetching, timeout=120, what="the prefetch")

    def idle(self) -> None:
        """Until the dock is idle: no pass, no change waiting, no prefetch under way."""
        live = self.w.live
        pump(self.app, lambda: not live.busy and not live.prefetching, timeout=120, what="the prefetch")
        settle(self.app, 0.1)

    def prefetched_gamma_steps(self, s: int, prompt: str, steps: int = 1) -> None:
        """Gamma moved by ``steps`` slider steps at once after the prefetch finished, ``repeats``
        times (each to a value not used before: upwards, or downwards near the slider's top)."""
        from napari_mias_sam.core import defaults

        w = self.w
        if str(w.prompt.value) != prompt:
            w.prompt.value = prompt
            settle(self.app, 0.3)
            pump(self.app, lambda: not w.live.busy)
        key = (f"gamma change by one slider step, prefetched ({prompt})" if steps == 1
               else f"gamma jump of {steps} slider steps, prefetched ({prompt})")
        direction = 1.0 if float(w.gamma.value) + self.repeats * steps * defaults.GAMMA_STEP <= defaults.GAMMA_RANGE[1] else -1.0
        ses = w.live.session
        redecode = ses.redecode
        decoded: dict[int, int] = {}

        def counted(t, generation=None):
            before = ses.decoder.misses
            try:
                return redecode(t, generation)
            finally:
                decoded[int(t)] = ses.decoder.misses - before

        ses.redecode = counted
        try:
            for _ in range(self.repeats):
                self.idle()
                decoded.clear()
                target = float(w.gamma.value) + direction * steps * defaults.GAMMA_STEP
                self.change(key, lambda v=target: setattr(w.gamma, "value", v), s)
                self.served.setdefault(key, []).append(decoded.get(s, -1) == 0)
        finally:
            del ses.redecode

    def mask_changes_during_prefetch(self, s: int, jumps: list[float]) -> None:
        """A mask change made while the prefetch decodes (gamma jumped to a value the default prompt
        has not used, the pass done, the prefetch of the new gamma's neighbours under way): what a
        user waits when acting at once."""
        w = self.w
        on = w.live.prefetch
        key = (f"mask change right after a gamma jump ({w.prompt.value}), "
               + ("while the prefetch runs" if on else "prefetch off (control)"))
        masks = [2, int(w.mask.value)]
        jumps = iter(jumps * 4)
        for i in range(self.repeats):
            self.idle()
            w.gamma.value = next(jumps)
            pump(self.app, lambda: not w.live.busy, timeout=120, what="gamma jump")
            settle(self.app, 0.1)  # the same in both cases: the pass's last repaints done (the prefetch started)
            running = w.live._prefetch_thread is not None and w.live._prefetch_thread.is_alive()
            self.change(key, lambda m=masks[i % 2]: setattr(w.mask, "value", m), s)
            if on:
                self.served.setdefault(key + " [prefetch was decoding]", []).append(running)
        w.mask.value = masks[-1]
        settle(self.app, 0.3)
        pump(self.app, lambda: not w.live.busy)

    def live_updates(self, s: int, *, drag: bool) -> None:
        w = self.w
        live = w.live
        live.jump_to(s)
        settle(self.app, 0.5)
        self.set_prefetch(False)  # the cold figures
        default_prompt = str(w.prompt.value)
        fresh = iter([2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0] * 4)

        def other_gamma():  # a value not used before on this volume: the decoder cannot remember it
            v = next(fresh)
            return v if v != float(w.gamma.value) else next(fresh)

        for i in range(self.repeats):
            self.change(f"gamma change ({default_prompt})", lambda: setattr(w.gamma, "value", other_gamma()), s)
        masks = [2, int(w.mask.value)]
        for i in range(self.repeats):
            self.change(f"mask change ({default_prompt})", lambda m=masks[i % 2]: setattr(w.mask, "value", m), s)
        w.mask.value = masks[-1]
        settle(self.app, 0.3)
        pump(self.app, lambda: not w.live.busy)
        prompts = ["cog-box", default_prompt]
        for i in range(2 * ((self.repeats + 1) // 2)):
            self.change("prompt change", lambda p=prompts[i % 2]: setattr(w.prompt, "value", p), s)
        if default_prompt != "cog-box":
            w.prompt.value = "cog-box"
            settle(self.app, 0.3)
            pump(self.app, lambda: not w.live.busy)
            for i in range(self.repeats):
                self.change("gamma change (cog-box)", lambda: setattr(w.gamma, "value", other_gamma()), s)
            w.prompt.value = default_prompt
            settle(self.app, 0.3)
            pump(self.app, lambda: not w.live.busy)
        if drag:
            for i in range(self.repeats):
                self.drag_point(s, 6.0 if i % 2 == 0 else -6.0)
            w.reset_points_btn.native.click()
            settle(self.app, 0.3)
            pump(self.app, lambda: not w.live.busy)
        self.set_prefetch(True)
        for prompt in dict.fromkeys([default_prompt, "cog-box"]):
            self.prefetched_gamma_steps(s, prompt)
        self.prefetched_gamma_steps(s, "cog-box", steps=4)  # a jump: 2.0 at once (within the prefetch's +-3.0)
        if default_prompt != "cog-box":
            self.prefetched_gamma_steps(s, default_prompt, steps=4)
        if str(w.prompt.value) != default_prompt:
            w.prompt.value = default_prompt
            settle(self.app, 0.3)
            pump(self.app, lambda: not w.live.busy)
        # gammas not timed cold with this prompt (2, 3, 4, 6, 7, ...) nor prefetched around them
        self.mask_changes_during_prefetch(s, [1.0, 3.5, 6.5, 9.5, 11.5])
        self.set_prefetch(False)
        self.mask_changes_during_prefetch(s, [0.5, 2.5, 5.5, 8.5, 10.5])
        if str(w.prompt.value) != default_prompt:
            w.prompt.value = default_prompt
            settle(self.app, 0.3)
            pump(self.app, lambda: not w.live.busy)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=Path, default=None, help="a saved bank folder (default: built from the sample normals, cached)")
    ap.add_argument("--repeats", type=int, default=5, help="times each change is timed (default 5)")
    ap.add_argument("--tall", type=int, default=0, metavar="N", help="also time live updates on an N-slice volume (e.g. 155)")
    ap.add_argument("--size", default="1920x1080", help="window size WxH (default: a 1080p screen)")
    a = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend")
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mias_sam.core.paths import cache_dir
    from napari_mias_sam.jobs.demo import sample_files

    os.environ["MIAS_SAM_PREFETCH"] = "0"  # cold until the prefetched figures (the runs would prefetch gammas timed cold)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()
    files = sample_files()
    viewer = napari.Viewer(title="napari-mias-sam latency", show=True)
    app = QApplication.instance()
    w_px, h_px = (int(v) for v in a.size.split("x"))
    viewer.window.resize(w_px, h_px)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mias-sam", "MIAS-SAM")
    widget.device.value = "cpu"
    bench = Bench(viewer, widget, app, a.repeats)
    image, gt = bench.open_case(files["case"], files["gt"])

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files["normals"])).hexdigest()[:12]
    bank_dir = a.bank or (cache_dir() / "banks" / f"sample-litemedsam-{digest}")
    if (bank_dir / "manifest.json").is_file():
        widget.bank_path.value = bank_dir
        widget.load_btn.native.click()
        pump(app, lambda: widget.job.done, what="loading the bank")
    else:
        print(f"building the bank from the sample normals (once; kept in {bank_dir})", flush=True)
        widget.sample_normals_btn.native.click()
        widget.build_btn.native.click()
        pump(app, lambda: widget.job.done, timeout=3600, what="building the bank")
        widget.bank_path.value = bank_dir
        widget.save_btn.native.click()
        pump(app, lambda: widget.job.done, what="saving the bank")
    if widget.bank is None:
        raise SystemExit("no memory bank: " + widget.message.text())

    first = bench.run(image, "first run")
    res = widget.live.session.result
    print(f"first run: {first:.1f} s (embeddings {'from the cache' if res.encoded.from_cache else 'encoded'}); "
          f"stages: " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()), flush=True)
    widget.gt.value = gt
    s = bench.lesion_slice(gt)
    widget.live.jump_to(s)
    settle(app, 0.5)
    for _ in range(a.repeats):
        bench.add("rerun, maps reused: Run -> layers drawn", bench.run(image, "rerun"))
        if not widget.live.session.result.maps_reused:
            raise SystemExit("the rerun did not reuse the anomaly maps")
    print("  rerun stages: " + ", ".join(f"{k} {v:.2f}" for k, v in widget.live.session.result.timings.items()))
    bench.live_updates(s, drag=True)
    n16 = widget.live.session.n_slices
    results = {f"[{image.name}, {n16} slices] {k}": v for k, v in bench.results.items()}
    served = {f"[{image.name}, {n16} slices] {k}": v for k, v in bench.served.items()}

    if a.tall:
        bench.results, bench.served = {}, {}
        vol, seg = tall_volume(files, a.tall, cache_dir() / "benchmark-volumes")
        image, gt = bench.open_case(vol, seg)
        first = bench.run(image, f"first run ({a.tall} slices)")
        res = widget.live.session.result
        print(f"first run on {a.tall} slices: {first:.1f} s (embeddings {'from the cache' if res.encoded.from_cache else 'encoded'}); "
              f"stages: " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()), flush=True)
        widget.gt.value = gt
        s = bench.lesion_slice(gt)
        bench.live_updates(s, drag=False)
        results.update({f"[{image.name}, {a.tall} slices] {k}": v for k, v in bench.results.items()})
        served.update({f"[{image.name}, {a.tall} slices] {k}": v for k, v in bench.served.items()})

    print(f"\nviewer latency, measured {started} on {platform.node()} ({platform.machine()}, "
          f"{os.cpu_count()} CPUs, {platform.python_version()}, napari {napari.__version__}); "
          f"load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}; {a.repeats} repeats:")
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"  {k:{width}s}  {stats(v)}")
    for k, v in served.items():
        if k.endswith("[prefetch was decoding]"):
            print(f"  {k[:-len(' [prefetch was decoding]')]}: a prefetch thread was running at {sum(v)} of {len(v)} changes")
        else:
            print(f"  {k}: the shown slice came from the decoder's cache in {sum(v)} of {len(v)} changes")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
