"""Live QA of one run in the viewer: the three output layers, settings changes and moved CoG
points re-decoded in the background (current slice first), Dice against a ground truth, the
false-positive / false-negative overlay and the per-slice profile.

The computations are :class:`napari_mias_sam.viewer.models.live.LiveSession` methods and the pure helpers of
:mod:`napari_mias_sam.viewer.models.live`; this module only moves their results into napari layers. :class:`LiveController` uses only what
:class:`LiveHost` declares of the widget (a test checks it).

Where the time of a live update goes: the changed slice's decode (background thread; a slice's
region pieces decoded side by side, one per core), then on the GUI thread only what that slice
changes: its row of the mask array, its point (the points array is written in place), its boxes,
its Dice counts (:class:`~napari_mias_sam.viewer.models.compare.DiceTracker`), and a refresh of
the layers only when the slice is the one shown. The pass waits (at most :data:`SHOWN_WAIT_S`)
until the shown slice is drawn before it decodes the others, so that the canvas paint does not
share the two cores with them; the dock's readout of that slice (Dice, IoU, review) is written
just after the paint. The rest of the volume's slices are written into the layers' arrays as they
arrive (napari draws them when the user gets there); the QA columns are recomputed once the
updates pause. Gamma, the mask and dragged points are applied at once (no debounce; a prompt
change on the next turn of the event loop): a newer change supersedes a pass at its next slice.
Once idle, the shown slice is decoded ahead at the next gamma values on one core
(:mod:`napari_mias_sam.viewer.models.prefetch`); every change stops that at once.
Measured timings: docs/performance.md, section 7.

Size: about 700 lines because one controller owns every output layer of a run and keeps them in
step (layers, points, background re-decoding, comparison, profile); the computations themselves are
in :mod:`napari_mias_sam.viewer.models.live`, the review of the prompts in :mod:`napari_mias_sam.viewer.widget_review`.
"""

import logging
import threading
import time
from functools import partial
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import napari
from qtpy.QtCore import QObject, QTimer

from .widget_threads import start_generator
from .models.live import CHANGE_MASK, CHANGE_PROMPT, CHANGE_RERUN, LiveSession, ranked_slices
from .models.prefetch import gamma_neighbours, prefetch_enabled, prefetch_gammas
from ..backbones.base import DecodeStop
from ..data.datasets import lesion_mask
from .models.compare import FN, FP, DiceTracker, error_overlay, error_slice
from ..data.qa_table import CORRECTED
from .models.layers import GEOMETRY_KEYS, geometry_metadata
from .widget_review import ReviewController, status_colors

__all__ = ["LiveHost", "LiveController", "is_output_layer", "OUTPUT_KEY", "plural"]

OUTPUT_KEY = "mias_sam"  # layer.metadata key marking (and describing) MIAS-SAM outputs
MASK_COLOR = "lime"
POINT_COLOR = "red"  # a computed prompt centre (review status pending; the others: widget_review.STATUS_COLORS)
MOVED_COLOR = "orange"  # a prompt centre the user moved (kept until "Reset moved points"): corrected
BOX_COLOR = "white"  # the box prompt sent to the decoder
GT_COLOR = "cyan"  # the ground truth's outline
ERROR_COLORS = {"FP": "yellow", "FN": "magenta"}
QA_DELAY_MS = 300  # the QA columns are recomputed this long after the last live update
STATE_DELAY_MS = 250  # a pass still running after this long says "updating slices..."
HEAD_START_S = 0.04  # the GUI thread waits at most this long for a pass to reach the decoder (see refresh)
SHOWN_WAIT_S = 0.06  # a pass waits at most this long for the shown slice to be drawn (one canvas paint) before the rest
PREFETCH_DELAY_MS = 100  # the shown slice is decoded ahead at the next gammas this long after the viewer went idle


def is_output_layer(layer) -> bool:
    return isinstance(getattr(layer, "metadata", None), dict) and OUTPUT_KEY in layer.metadata


def _direct_colormap(colors: dict):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", **colors})


def _same_features(table, feats: dict) -> bool:
    """Whether a layer's features table holds exactly ``feats`` (column name -> values)."""
    if list(table.columns) != list(feats) or len(table) != len(next(iter(feats.values()), ())):
        return False
    return all(np.array_equal(table[c].to_numpy(), np.asarray(v)) for c, v in feats.items())


def plural(n: int, word: str) -> str:
    """'1 moved point', '2 moved points'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fmt(v) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


@runtime_checkable
class LiveHost(Protocol):
    """What :class:`LiveController` needs from the widget: the viewer, the controls it reads or
    writes, and whether a settings change is still waiting. Nothing else."""

    viewer: Any
    status: Any
    iou_info: Any
    dice_info: Any
    gt: Any
    show_errors: Any
    profile: Any

    def settings_pending(self) -> bool: ...

    def iou_tracks_quality(self) -> bool: ...

    def report_error(self, text: str) -> None: ...

    def show_message(self, text: str, level: str = "info") -> None: ...

    def show_counts(self, text: str) -> None: ...

    def show_live_state(self, text: str) -> None: ...

    def gt_lesion_labels(self, gt_layer: Any) -> Optional[tuple]: ...


class LiveController:
    """Owns the output layers of one run and keeps them in step with the session."""

    def __init__(self, widget: LiveHost, session: LiveSession, source, *, reuse: Optional[dict] = None,
                 previous: Optional["LiveController"] = None) -> None:
        self.w = widget
        self.viewer: napari.Viewer = widget.viewer
        self.session = session
        self.source = source
        self.layers: dict = {}
        self.last_compare: Optional[dict] = None
        self._worker = None
        self._active_gen: Optional[int] = None  # generation of the newest background pass, until it ends
        self.updated: list = []  # slices shown by the latest background pass, in order
        self._unshown: set = set()  # slices a pass was asked to show and none has shown yet
        self._updating_points = False
        self._snapshot: Optional[np.ndarray] = None
        self._last_refresh = 0.0
        self._rank_pos = -1
        self._tracker: Optional[DiceTracker] = None  # per-slice Dice counts against the picked ground truth
        self._tracker_key: Optional[tuple] = None  # (ground-truth layer, lesion labels) it counts against
        self._styled: list = []  # ground-truth layers already given their outline style
        if previous is not None:  # a rerun of the same layer: its layers and ground-truth styling carry over
            reuse = previous.layers if reuse is None else reuse
            self._styled = [gt for gt in previous._styled if gt in self.viewer.layers]
            for gt in self._styled:
                self._watch_gt(gt)
        self._lesion = None
        self._point_rows: dict = {}  # slice -> rows of the CoG points layer (one per prompt)
        self._points_dirty = False  # a slice's number of prompts changed while not shown: rebuild at the pass's end
        self._points_owned = None  # the points array this controller set (written in place)
        self._box_drawn: dict = {}  # slice -> (corner arrays, kind) of the boxes drawn
        self._box_dirty: set = set()  # slices whose boxes changed and are not drawn yet
        # The timers are the dock's children: they go with it (none fires into a closed dock).
        dock = widget if isinstance(widget, QObject) else None
        # The shown slice's boxes are redrawn just after its mask (a second, short paint).
        self._box_timer = QTimer(dock)
        self._box_timer.setSingleShot(True)
        self._box_timer.setInterval(0)
        self._box_timer.timeout.connect(self._rebuild_boxes)
        # The QA columns (a pass over every slice) wait until the updates pause.
        self._qa_timer = QTimer(dock)
        self._qa_timer.setSingleShot(True)
        self._qa_timer.setInterval(QA_DELAY_MS)
        self._qa_timer.timeout.connect(self._deferred_qa)
        # "updating slices..." only for passes that take a while (every text change repaints the window).
        self._state_timer = QTimer(dock)
        self._state_timer.setSingleShot(True)
        self._state_timer.setInterval(STATE_DELAY_MS)
        self._state_timer.timeout.connect(self._show_updating)
        # The shown slice's readout (Dice, IoU, review) is written just after its mask is drawn,
        # and then the pass decodes the other slices (it waits on ``_drawn`` until then).
        self._readout_timer = QTimer(dock)
        self._readout_timer.setSingleShot(True)
        self._readout_timer.setInterval(0)
        self._readout_timer.timeout.connect(self._after_shown)
        self._drawn = threading.Event()
        self._hold = False  # the running pass waits for the shown slice to be drawn
        # Idle: the shown slice is decoded ahead at the gamma values next to the current one.
        self.prefetch = prefetch_enabled()  # MIAS_SAM_PREFETCH=0 turns it off
        self._prefetch_thread: Optional[threading.Thread] = None
        self._prefetch_stop: Optional[DecodeStop] = None  # the running prefetch's: stopped by any change
        self._prefetch_key: Optional[tuple] = None
        self._prefetch_timer = QTimer(dock)
        self._prefetch_timer.setSingleShot(True)
        self._prefetch_timer.setInterval(PREFETCH_DELAY_MS)
        self._prefetch_timer.timeout.connect(self._start_prefetch)
        if dock is not None:  # a dock deleted without closing (the viewer closed): stop as close() does
            dock.destroyed.connect(self._on_dock_destroyed)
        self.review = ReviewController(widget, self)
        self._show(reuse or {}, previous._points_owned if previous is not None else None)
        self.update_compare(full=True)
        self.on_slice_changed()

    # -- layers ---------------------------------------------------------------------------------
    def _transform(self) -> dict:
        s = self.source
        out = {"affine": s.affine.affine_matrix, "scale": s.scale, "translate": s.translate,
               "rotate": s.rotate, "shear": s.shear}
        if getattr(s, "axis_labels", None) is not None:  # napari >= 0.6: the sliders' anatomical names
            out["axis_labels"] = tuple(s.axis_labels)
        return out

    def _metadata(self, role: str) -> dict:
        src = self.source.metadata or {}
        if all(k in src for k in ("affine", "display_axes")):
            geo = {k: src.get(k) for k in GEOMETRY_KEYS}
        else:
            geo = geometry_metadata(self.session.result.volume, self.session.axes)
        info = {**self.session.metadata(), "layer": role, "source_layer": self.source.name}
        if role == "errors":  # what the overlay was computed against
            gt = self._gt_layer()
            info.update(ground_truth=gt.name if gt is not None else None,
                        lesion_labels=None if self._lesion is None else list(self._lesion))
        return {**geo, OUTPUT_KEY: info}

    def _put(self, role: str, reuse: dict, kind: str, data, name: str, **kwargs):
        """The layer of ``role``: the previous run's, given the new data where it differs (a rerun
        whose maps or masks came out the same sets nothing), else a new one."""
        old = reuse.get(role)
        if old is not None and old in self.viewer.layers and old.data.shape == np.shape(data):
            if kind == "labels":  # same shape: written in place (setting .data recomputes the viewer's dims)
                if not np.array_equal(old.data, data):
                    old.data[...] = data
                    old.refresh()
            elif not np.array_equal(np.asarray(old.data), data):
                old.data = data
            old.metadata = self._metadata(role)
            if "features" in kwargs and not _same_features(old.features, kwargs["features"]):
                old.features = kwargs["features"]
            layer = old
        else:
            if old is not None and old in self.viewer.layers:
                self.viewer.layers.remove(old)
            add = {"image": self.viewer.add_image, "labels": self.viewer.add_labels, "points": self.viewer.add_points}[kind]
            layer = add(data, name=name, metadata=self._metadata(role), **self._transform(), **kwargs)
        self.layers[role] = layer
        return layer

    def _show(self, reuse: dict, previous_points=None) -> None:
        ses, name = self.session, self.source.name
        amap = ses.anomaly_display()
        fg = amap[amap > 0]
        top = float(np.percentile(fg, 99.9)) if fg.size else 1.0
        # From 0.5 (the paper's threshold; half the strongest normal response in calibrated units),
        # so normal tissue stays dark and adds nothing to the volume under it.
        self._put("anomaly", reuse, "image", amap, f"{name} anomaly", colormap="inferno", blending="additive",
                  opacity=0.8, contrast_limits=(0.5, max(top, 1.0)))
        fresh = reuse.get("mask") is None or reuse.get("mask") not in self.viewer.layers
        mask = self._put("mask", reuse, "labels", ses.mask_display(), f"{name} mask", opacity=0.5)
        if fresh or mask is not reuse.get("mask"):
            mask.colormap = _direct_colormap({1: MASK_COLOR})
        mask.events.paint.connect(self._on_painted)  # hand edits of the mask count in the Dice
        self._show_boxes(reuse)
        coords, feats = ses.points()
        pts = self._put("points", reuse, "points", coords, f"{name} CoG", features=feats, face_color=POINT_COLOR,
                        border_color="white", size=self._point_size())
        colors = status_colors(feats["status"])
        if np.shape(pts.face_color) != colors.shape or not np.allclose(pts.face_color, colors):
            pts.face_color = colors
        self._snapshot = pts.data.copy()
        self._index_points(owned=pts.data is coords or (previous_points is not None and pts.data is previous_points))
        pts.events.data.connect(self._on_points_data)
        self.review.bind_keys(pts)
        if "errors" in reuse and reuse["errors"] in self.viewer.layers:
            self.viewer.layers.remove(reuse["errors"])
        self._order_layers()
        self.viewer.layers.selection.active = pts
        r = ses.result
        self.w.profile.set_data(r.image_scores, r.encoded.foreground, r.decision_threshold,
                                dropped=r.encoded.foreground & ~np.asarray(r.decision, bool))

    def _show_boxes(self, reuse: dict) -> None:
        """The Shapes layer of box prompts (one rectangle per prompted slice, ``kind`` in its
        features), between the mask and the CoG points."""
        old = reuse.get("boxes")
        if old is not None and old in self.viewer.layers:
            self.layers["boxes"] = old
            old.metadata = self._metadata("boxes")
        else:
            self.layers["boxes"] = self.viewer.add_shapes(
                ndim=3, name=f"{self.source.name} prompt box", metadata=self._metadata("boxes"), face_color="transparent",
                edge_color=BOX_COLOR, edge_width=self._edge_width(), opacity=0.9, **self._transform())
        self._rebuild_boxes()

    def _edge_width(self) -> float:
        return max(1.0, self._point_size() / 6)

    def _rebuild_boxes(self) -> None:
        """Every slice's boxes from the session. napari's Shapes layer has no public way to move one
        shape, and adding or removing shapes costs about as much as setting them all (its dims are
        recomputed), so the boxes are set together: once per pass, and for the slice shown just after
        its mask is drawn."""
        self._box_timer.stop()
        layer = self.layers.get("boxes")
        self._box_dirty.clear()
        if layer is None or layer not in self.viewer.layers:
            return
        shapes, feats = self.session.prompt_shapes()
        held = layer.data
        if not (len(held) == len(shapes) and _same_features(layer.features, feats)
                and all(np.array_equal(np.asarray(a), b) for a, b in zip(held, shapes))):
            layer.data = []
            if shapes:
                colors = [MOVED_COLOR if k == "moved" else BOX_COLOR for k in feats["kind"]]
                layer.add_rectangles(shapes, edge_width=self._edge_width(), edge_color=colors, face_color="transparent")
            layer.features = feats
        self._box_drawn = {}
        for corners, s, kind in zip(shapes, feats["slice"], feats["kind"]):
            self._box_drawn.setdefault(int(s), ([], str(kind)))[0].append(np.asarray(corners, dtype=float))
        layer.refresh()

    def _boxes_changed(self, upd) -> bool:
        """Whether slice ``upd.s``'s boxes differ from the ones drawn."""
        drawn, kind = self._box_drawn.get(int(upd.s), ([], ""))
        new = upd.boxes or []
        if len(new) != len(drawn):
            return True
        return bool(new) and (kind != upd.box_kind or any(not np.array_equal(a, b) for a, b in zip(new, drawn)))

    def _order_layers(self) -> None:
        """Outputs over their source: map, mask, ground truth, FP/FN, boxes, and the CoG points on top."""
        order = [self.layers.get("anomaly"), self.layers.get("mask"), self._gt_layer(), self.layers.get("errors"),
                 self.layers.get("boxes"), self.layers.get("points")]
        present = [lay for lay in order if lay is not None and lay in self.viewer.layers]
        layers = self.viewer.layers
        if [lay for lay in layers][len(layers) - len(present):] == present:  # (a slice of the LayerList builds a new evented list)
            return
        for lay in present:  # each to the top in turn: the points end on top
            layers.move(layers.index(lay), len(layers))

    def _point_size(self) -> float:
        shape = [s for a, s in enumerate(self.source.data.shape) if a != self.session.display_axis]
        return float(max(3.0, 0.04 * max(shape)))

    def _refresh_metadata(self) -> None:
        for role, layer in self.layers.items():
            if layer in self.viewer.layers:
                layer.metadata = self._metadata(role)

    def close(self) -> None:
        """Stop background work and detach from the layers (they stay in the viewer)."""
        self.session.new_generation()
        if self._worker is not None:
            self._worker.quit()
        self.stop_prefetch()
        self._qa_timer.stop()
        self._state_timer.stop()
        self._box_timer.stop()
        self._readout_timer.stop()
        self._drawn.set()  # a pass waiting for its slice to be drawn ends
        hooks = [(self.layers.get("points"), "data", self._on_points_data), (self.layers.get("mask"), "paint", self._on_painted)]
        hooks += [(gt, ev, self._on_gt_edited) for gt in self._styled for ev in ("paint", "data")]
        for layer, event, slot in hooks:
            if layer is not None:
                try:
                    getattr(layer.events, event).disconnect(slot)
                except (TypeError, ValueError, RuntimeError):
                    pass

    def _on_dock_destroyed(self, _obj=None) -> None:
        self.session.new_generation()  # background passes stop; their last signals are ignored
        if self._prefetch_stop is not None:
            self._prefetch_stop.stop()
        self._drawn.set()

    def _on_painted(self, _event=None) -> None:
        self.update_compare(full=True)

    # -- where we are ---------------------------------------------------------------------------
    def current_slice(self) -> int:
        pos = tuple(self.viewer.dims.point)[-self.source.ndim:]
        return self.session.slice_of(self.source.world_to_data(pos))

    def jump_to(self, s: int) -> None:
        """Move the viewer to pipeline slice ``s`` (through its prompt point when it has one)."""
        ses = self.session
        p = ses.point(s)
        if p is None:
            centre = [(n - 1) / 2 for n in self.source.data.shape]
            centre[ses.display_axis] = s
            p = tuple(centre)
        world = np.asarray(self.source.data_to_world(p), dtype=float)
        off = self.viewer.dims.ndim - len(world)
        for ax in self.viewer.dims.not_displayed:
            if ax - off >= 0:
                self.viewer.dims.set_point(ax, world[ax - off])

    def next_anomalous(self) -> int:
        order = ranked_slices(self.session.result.image_scores, self.session.result.encoded.foreground)
        self._rank_pos = (self._rank_pos + 1) % len(order)
        s = order[self._rank_pos]
        self.jump_to(s)
        return s

    def on_slice_changed(self) -> None:
        s = self.current_slice()
        self.w.profile.set_current(s)
        self.w.iou_info.value = self.slice_readout(s)
        self.update_compare(full=False)
        self.review.show_info()
        if self.prefetch and self._active_gen is None:
            self._prefetch_timer.start()  # (again: scrolling through slices prefetches the one it stops at)

    # -- prefetch: the shown slice at the next gamma values ----------------------------------------
    @property
    def prefetching(self) -> bool:
        """True while the shown slice is being decoded ahead (or about to be)."""
        return self._prefetch_timer.isActive() or (self._prefetch_thread is not None and self._prefetch_thread.is_alive())

    def stop_prefetch(self) -> None:
        """The running prefetch stops, its decode in flight included (every change calls this)."""
        self._prefetch_timer.stop()
        if self._prefetch_stop is not None:
            self._prefetch_stop.stop()  # the decode in flight ends within a few milliseconds

    def _start_prefetch(self) -> None:
        """Decode the shown slice ahead at the gamma values up to ``defaults.PREFETCH_STEPS`` slider
        steps either side, nearest first (:func:`~napari_mias_sam.viewer.models.prefetch.prefetch_gammas`, one core, in a thread of
        its own), when no pass runs and no change waits: a step of the slider then finds its decodes
        in the decoder's cache. Every change stops it at once (:meth:`stop_prefetch`)."""
        ses = self.session
        if (not self.prefetch or self._active_gen is not None or self.w.settings_pending() or ses.stale
                or self.layers.get("mask") not in self.viewer.layers):
            return
        s = self.current_slice()
        key = (s, ses.generation, ses.settings, len(ses.overrides), ses.overrides.get(s), ses.moved_piece.get(s))
        if key == self._prefetch_key and self.prefetching:
            return  # already under way
        if self._prefetch_stop is not None:
            self._prefetch_stop.stop()
        stop = self._prefetch_stop = DecodeStop()
        self._prefetch_key = key
        gammas = gamma_neighbours(ses.settings.gamma)

        def run() -> None:
            try:
                prefetch_gammas(ses, s, gammas, key[1], stop=stop)
            except Exception:  # it only saves time: the real change decodes what it needs
                logging.getLogger(__name__).debug("prefetch of slice %d failed", s, exc_info=True)

        self._prefetch_thread = threading.Thread(target=run, name="mias-sam-prefetch", daemon=True)
        self._prefetch_thread.start()

    def slice_readout(self, s: int) -> str:
        """One line on slice ``s``: its prompt (moved or not, dropped by the slice decision) and,
        where the backbone's IoU head tracks quality, each mask's predicted IoU."""
        ses = self.session
        p = ses.result.prompts[s]
        if p is None:
            levels = ses.result.region_levels
            if ses.settings.prompt == "regions" and levels is not None:
                return f"slice {s}: no prompt (no region: the map stays below the bank's levels, {levels.describe()})"
            return f"slice {s}: no prompt (no anatomy or no anomaly response)"
        kind = "moved point" if s in ses.overrides else str(ses.settings.prompt)
        text = f"slice {s}: {kind}"
        if not ses.result.decision[s]:
            return text + ", mask dropped by the slice decision"
        rule = ses.mask_rule_text(s)
        if rule:
            text += f"; kept {rule}"
        ious = ses.ious(s)
        if not self.w.iou_tracks_quality():
            return text + " (IoU not shown: this backbone's IoU head does not track mask quality)"
        if np.isfinite(ious).any():
            text += "; predicted IoU " + "  ".join(f"mask {i + 1}: {_fmt(v)}" for i, v in enumerate(ious))
        return text

    # -- refreshing from the session ------------------------------------------------------------------
    def apply_settings(self, settings) -> str:
        kind = self.session.change_settings(settings)
        if kind == CHANGE_RERUN:
            self.w.show_message("k, the normalisation and the slice decision change the anomaly maps: press "
                                "Run MIAS-SAM again (the embeddings are cached; the nearest-neighbour search "
                                "reruns only when k or the bank changed). Moved points are kept.", "warning")
        elif kind in (CHANGE_PROMPT, CHANGE_MASK):
            self.refresh()
        return kind

    def refresh(self, order: Optional[list] = None):
        """Update slices in ``order`` (default: all, the current slice first) in the background."""
        gen = self.session.new_generation()
        if self._worker is not None:
            self._worker.quit()
        self.stop_prefetch()
        if order is None:
            order = self.session.order_from(self.current_slice())
        # A superseded pass may have decoded a slice without showing it: the new pass shows it.
        order = list(order) + sorted(self._unshown - set(order))
        self._unshown |= set(order)
        self._qa_timer.stop()
        self._state_timer.start()
        self._active_gen = gen
        self.updated = []
        self._drawn.set()  # the superseded pass, if it waits, goes on (and stops at its next slice)
        self._drawn = drawn = threading.Event()
        # The shown slice first, alone on the CPU until it is drawn; then the others (a pass that
        # decodes nothing, a mask change, sends every slice at once: they are drawn together).
        decodes = bool(self.session.stale.intersection(order))
        first = decodes and bool(order) and order[0] == self.current_slice()
        self._hold = first
        started = threading.Event()

        def hold() -> None:
            started.set()
            drawn.wait(SHOWN_WAIT_S)

        self.session.decoder.before_decode = started.set if first else None
        self._worker = start_generator(self.session.refresh_iter, order, gen, None, hold if first else None,
                                       on_yield=partial(self._on_update, gen), on_finished=partial(self._on_done, gen))
        if first:
            # The shown slice's decode starts before the GUI thread goes back to the event loop: a
            # repaint of the window (the control just moved: about 30 ms in software OpenGL,
            # measured) holds the GIL and would keep the pass from reaching the decoder, which
            # releases it. Waiting here lets the decode and that repaint run side by side.
            started.wait(HEAD_START_S)
        return self._worker

    @property
    def busy(self) -> bool:
        """True from a change until its background pass has updated the layers and the QA columns
        (or a timer still holds a change)."""
        return (self._active_gen is not None or self.w.settings_pending()
                or self._qa_timer.isActive() or self._box_timer.isActive() or self._readout_timer.isActive())

    def _show_updating(self) -> None:
        if self._active_gen is not None:
            self.w.show_live_state("updating slices...")

    def _after_shown(self) -> None:
        """After the shown slice's new mask is drawn: its readout, then the rest of the pass."""
        self._drawn.set()
        self.on_slice_changed()

    def _on_update(self, gen: int, upd) -> None:
        """One slice's new mask, point and boxes; drawn at once when it is the slice shown."""
        if gen != self.session.generation or self.layers.get("mask") not in self.viewer.layers:
            return
        s = int(upd.s)
        mask = self.layers["mask"]
        self.updated.append(s)
        self._unshown.discard(s)
        idx = self.session.slice_index(s)
        changed = not np.array_equal(mask.data[idx], upd.mask)
        if changed:
            mask.data[idx] = upd.mask
            self._count_slice(s, upd.mask)
        rebuild_points = self._set_point(s, upd.points)
        if self._boxes_changed(upd):
            self._box_dirty.add(s)
        shown = s == self.current_slice()
        everything = self.viewer.dims.ndisplay == 3  # a 3D view shows every slice
        if rebuild_points and not shown:
            self._points_dirty = True
        now = time.perf_counter()
        if shown and self._hold:  # drawn first (the canvas paints before a 0 ms timer fires), then the readout
            self._readout_timer.start()
        elif not self._drawn.is_set() and self.updated == [s]:
            self._drawn.set()
        if shown or (everything and now - self._last_refresh > 0.25):
            self._last_refresh = now
            if changed or everything:
                mask.refresh()
                if "errors" in self.layers:
                    self.layers["errors"].refresh()
            if rebuild_points:
                self._rebuild_points()
            else:
                self.layers["points"].refresh()
            if shown and not self._hold:  # a pass that decodes nothing: the readout in the same paint
                self.on_slice_changed()
            if self._box_dirty and (s in self._box_dirty or everything):
                self._box_timer.start()

    def _count_slice(self, s: int, mask2d: np.ndarray) -> None:
        """Slice ``s``'s mask changed: its Dice counts and its row of the FP/FN overlay."""
        if self._tracker is None:
            return
        self._tracker.update(s, mask2d)
        errs = self.layers.get("errors")
        if errs is not None and errs in self.viewer.layers:
            errs.data[self.session.slice_index(s)] = error_slice(mask2d, self._tracker.gt_slice(s), FP, FN)

    def _on_done(self, gen: int) -> None:
        if gen == self._active_gen:
            self._active_gen = None
        if gen != self.session.generation or self.layers.get("mask") not in self.viewer.layers:
            return
        self._state_timer.stop()
        if not self.session.stale:
            self.session.sync()
        if self.viewer.dims.ndisplay == 3:
            self.layers["mask"].refresh()
        if self._points_dirty or set(self._point_rows) != {s for s in range(self.session.n_slices) if self.session.point(s) is not None}:
            self._points_dirty = False
            self._rebuild_points()  # slices gained or lost a prompt
        if self._box_dirty:
            self._rebuild_boxes()
        self._refresh_metadata()
        self.on_slice_changed()
        self.review.show_info()
        self.w.show_live_state("up to date" if not self.session.stale else f"{len(self.session.stale)} slices not updated yet")
        self.w.show_counts(self.counts_text())
        self._qa_timer.start()

    def _deferred_qa(self) -> None:
        """The QA columns, once the live updates have paused."""
        if self._active_gen is not None:
            return  # a pass is running: its end starts the timer again
        self.review.update_qa()

    def counts_text(self) -> str:
        """How many slices kept a mask (and why the others did not)."""
        mask = self.layers.get("mask")
        nonempty = None
        if mask is not None and mask in self.viewer.layers:
            m = np.moveaxis(np.asarray(mask.data), self.session.display_axis, 0)
            nonempty = m.reshape(m.shape[0], -1).any(axis=1)
        c = self.session.mask_counts(nonempty)
        text = f"{c['kept']} of {c['prompted']} prompted slices kept a mask"
        if c["dropped"]:
            text += f"; the slice decision dropped {c['dropped']}"
        if c["anatomy"] > c["prompted"]:
            text += f"; {c['anatomy'] - c['prompted']} slices had no anomaly response"
        if self.session.overrides:
            text += f"; {plural(len(self.session.overrides), 'moved point')}"
        return text

    # -- points ---------------------------------------------------------------------------------
    def _index_points(self, owned: bool = False) -> None:
        """Slice -> rows of its CoG points (one per prompt); ``owned``: this controller just set the
        layer's array."""
        pts = self.layers.get("points")
        self._points_owned = pts.data if (owned and pts is not None) else None
        slices = pts.features["slice"].to_numpy() if (pts is not None and len(pts.data)) else []
        rows: dict[int, list[int]] = {}
        for i, s in enumerate(slices):
            rows.setdefault(int(s), []).append(i)
        self._point_rows = rows

    def _set_point(self, s: int, points) -> bool:
        """Slice ``s``'s CoG points (one per prompt) move to ``points`` (in place). True when the
        points need a rebuild instead (their number changed: a region piece appeared or went)."""
        pts = self.layers.get("points")
        if pts is None or pts not in self.viewer.layers:
            return False
        rows = self._point_rows.get(int(s), [])
        points = list(points or [])
        if len(rows) != len(points):
            return True
        if not rows:
            return False
        self._updating_points = True
        try:
            if pts.data is not self._points_owned:  # an array someone else set (and may hold): not written in place
                pts.data = np.array(pts.data, dtype=float)
                self._points_owned = pts.data
            for row, p in zip(rows, points):
                pts.data[row] = p
            if self._snapshot is not None and len(self._snapshot) == len(pts.data):
                for row, p in zip(rows, points):
                    self._snapshot[row] = p
            else:
                self._snapshot = pts.data.copy()
            ses, status = self.session, self.session.status(s)
            moved = [s in ses.overrides and ses.moved_piece.get(s, 0) == j for j in range(len(rows))]
            if (any(pts.features["status"].iloc[r] != status for r in rows)
                    or [bool(pts.features["moved"].iloc[r]) for r in rows] != moved):
                pts.features.loc[rows, "status"] = status
                pts.features.loc[rows, "moved"] = moved
                pts.face_color = status_colors(pts.features["status"].to_numpy())
        finally:
            self._updating_points = False
        return False

    def _rebuild_points(self) -> None:
        pts = self.layers.get("points")
        if pts is None or pts not in self.viewer.layers:
            return
        coords, feats = self.session.points()
        self._updating_points = True
        try:
            pts.data = coords
            pts.features = feats
            pts.face_color = status_colors(feats["status"])
            self._snapshot = pts.data.copy()
        finally:
            self._updating_points = False
        self._index_points(owned=True)
        pts.refresh()

    def _on_points_data(self, event) -> None:
        action = getattr(getattr(event, "action", None), "value", getattr(event, "action", None))
        if self._updating_points or action != "changed":
            return
        pts = self.layers["points"]
        data = np.asarray(pts.data)
        if self._snapshot is None or data.shape != self._snapshot.shape:
            self._snapshot = data.copy()
            return
        moved = np.flatnonzero(np.any(np.abs(data - self._snapshot) > 1e-6, axis=1))
        if moved.size == 0:
            return
        slices = pts.features["slice"].to_numpy()
        pieces = pts.features["piece"].to_numpy() if "piece" in pts.features else np.zeros(len(slices), int)
        for i in moved:
            self.session.move_point(int(slices[i]), data[i], piece=int(pieces[i]))
        self._snapshot = data.copy()
        # A drag ends with one "changed" event (every point it moved): their slices decode at once,
        # the moved slice first, while the points are recoloured.
        self._apply_moves()
        self._updating_points = True
        try:  # a moved point turns orange (corrected) at once
            pts.features.loc[moved, "moved"] = True
            pts.features.loc[moved, "status"] = CORRECTED
            pts.face_color = status_colors(pts.features["status"].to_numpy())
        finally:
            self._updating_points = False
        self.review.show_info()

    def show_statuses(self) -> None:
        """The CoG points' review status (features and colours) from the session."""
        pts = self.layers.get("points")
        if pts is None or pts not in self.viewer.layers or not len(pts.data):
            return
        feats = pts.features.copy()
        slices = feats["slice"].to_numpy()
        feats["status"] = [self.session.status(int(s)) for s in slices]
        feats["moved"] = [int(s) in self.session.overrides for s in slices]
        self.set_points_features(feats)

    def set_points_features(self, feats) -> None:
        """New features for the CoG points (same rows), coloured by review status."""
        pts = self.layers["points"]
        self._updating_points = True
        try:
            pts.features = feats
            pts.face_color = status_colors(feats["status"].to_numpy())
        finally:
            self._updating_points = False
        pts.refresh()

    def _apply_moves(self) -> None:
        stale = sorted(self.session.stale, key=lambda s: abs(s - self.current_slice()))
        if stale:
            self.refresh(order=stale)

    def reset_points(self) -> None:
        slices = self.session.reset_points()
        if slices:
            self.refresh(order=sorted(set(slices) | set(self.session.stale)))

    # -- ground truth ---------------------------------------------------------------------------
    def _gt_layer(self):
        gt = self.w.gt.value
        return gt if gt is not None and gt in self.viewer.layers else None

    def update_compare(self, full: bool = True) -> Optional[dict]:
        """Dice of the current slice (always) and of the volume (``full``); the FP/FN overlay."""
        gt = self._gt_layer()
        mask = self.layers.get("mask")
        if gt is None or mask is None:
            self.last_compare = None
            self.w.dice_info.value = "Dice: choose a ground-truth Labels layer"
            self.w.profile.set_lesion(None)
            self._set_errors(None)
            return None
        if gt.data.shape != mask.data.shape:
            self.w.report_error(f"ground truth '{gt.name}' has shape {tuple(gt.data.shape)} but the mask has "
                                f"{tuple(mask.data.shape)}; choose the ground truth of '{self.source.name}'.")
            self.w.gt.value = None
            return None
        ax, s = self.session.display_axis, self.current_slice()
        if gt not in self._styled:
            self._style_ground_truth(gt)
        lesion = self.w.gt_lesion_labels(gt)  # which labels are the lesion (LiTS: 2, not the liver)
        key = (id(gt), None if lesion is None else tuple(lesion))
        if full or self._tracker is None or self._tracker_key != key:
            gt_mask = lesion_mask(gt.data, lesion)
            self._lesion = lesion
            self._tracker, self._tracker_key = DiceTracker(mask.data, gt_mask, axis=ax), key
            self.w.profile.set_lesion(self._tracker.lesion_slices())
            self._set_errors(error_overlay(mask.data, gt_mask) if self.w.show_errors.value else None)
        res = dict(self._tracker.summary(s), lesion_labels=None if lesion is None else list(lesion))
        self.last_compare = res
        where = "lesion" if res["slice_has_lesion"] else "no lesion"
        counted = "any non-zero label" if lesion is None else "labels " + ",".join(map(str, lesion))
        self.w.dice_info.value = (
            f"Dice, slice {s} ({where}; lesion = {counted}): {_fmt(res['slice_dice'])}\n"
            f"Dice, volume (3D): {_fmt(res['volume_dice'])}\n"
            f"mean slice Dice over {res['lesion_slices']} lesion slices: {_fmt(res['mean_slice_dice'])}"
        )
        return res

    def _style_ground_truth(self, gt) -> None:
        """Once per picked ground truth: a cyan outline (binary masks) drawn over the mask and the
        map, under the FP/FN overlay and the prompts; the CoG points stay the active layer."""
        self._styled.append(gt)
        self._watch_gt(gt)
        if gt.contour == 0:
            gt.contour = 2
        values = np.unique(np.asarray(gt.data)[:: max(1, gt.data.shape[0] // 16)])
        if set(values.tolist()) <= {0, 1}:
            gt.colormap = _direct_colormap({1: GT_COLOR})
            gt.opacity = 1.0
        self._order_layers()
        self._keep_points_active()

    def _watch_gt(self, gt) -> None:
        for ev in ("paint", "data"):  # an edited ground truth is counted again
            getattr(gt.events, ev).connect(self._on_gt_edited)

    def _on_gt_edited(self, _event=None) -> None:
        if self._gt_layer() is not None and self._tracker_key is not None and self._tracker_key[0] == id(self._gt_layer()):
            self.update_compare(full=True)

    def _keep_points_active(self) -> None:
        pts = self.layers.get("points")
        if pts is not None and pts in self.viewer.layers:
            self.viewer.layers.selection.active = pts

    def _set_errors(self, overlay: Optional[np.ndarray]) -> None:
        layer = self.layers.get("errors")
        present = layer is not None and layer in self.viewer.layers
        if overlay is None:
            if present:
                self.viewer.layers.remove(layer)
            self.layers.pop("errors", None)
            return
        if present and layer.data.shape == overlay.shape:
            layer.data = overlay
            layer.metadata = self._metadata("errors")
            return
        layer = self.viewer.add_labels(overlay, name=f"{self.source.name} FP/FN", metadata=self._metadata("errors"),
                                       opacity=1.0, **self._transform())
        layer.colormap = _direct_colormap({FP: ERROR_COLORS["FP"], FN: ERROR_COLORS["FN"]})
        layer.contour = 1  # outlines: the mask and the anatomy stay visible under them
        self.layers["errors"] = layer
        self._order_layers()
        self._keep_points_active()
