"""The MIAS-SAM dock widget: backbone and device, memory bank (build / load / save), a run on the
selected image layer in a background worker, live QA (``widget_live``) and the review of the
prompts (``widget_review``).

A thin layer: every computation is a call into the same modules the ``mias-sam`` command line
uses (``backbones``, ``file_steps``, ``bank``, ``pipeline``, ``viewer.live``, ``viewer.layers``).

Size: over 450 lines because the dock's controls, their layout, tooltips and wiring live in one
class; its bank, live and review parts are separate modules (``widget_bank``, ``widget_live``,
``widget_review``) that reach it only through the ``BankHost`` / ``LiveHost`` / ``ReviewHost``
protocols. Next cut when it grows: the section builders.
"""

from functools import partial
from typing import Optional

import napari
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    RadioButtons,
    SpinBox,
)
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QScrollArea, QSizePolicy, QVBoxLayout, QWidget
from superqt import QCollapsible

from .widget_bank import BankMixin, path_or_none
from .widget_dataset import DatasetMixin
from .widget_files import FilesMixin
from .widget_lesions import LesionPanel
from .widget_live import LiveController, is_output_layer, plural
from .models.prefetch import on_gamma_grid
from .widget_messages import MessageBar
from .widget_profile import ProfilePlot
from .widget_threads import Failed, Job, avoid_triton_llvm_crash
from ..core import defaults
from ..backbones import BACKBONES, iou_tracks_quality_for, point_prompts_work_for
from ..core.errors import Cancelled, InputError, MiasSamError
from ..method.prompts import PROMPT_RULES, PROMPT_TYPES, default_mask_for, default_prompt_for
from ..method.regions import regions_supported
from ..method.anomaly import NORMALISATIONS
from ..method.patches import PATCH_LAYOUTS
from ..method.preprocess import PREPROCESS_PRESETS
from ..pipeline.settings import VOLUME_PROMPT, SegmentSettings, resolve_defaults
from ..method.reference_encoding import encoding_of

__all__ = ["MiasSamWidget"]

DEVICES = ("auto", "cpu", "cuda", "mps")


#: Longest section title shown in full; longer ones are elided (the dock must fit a 1080p screen).
TITLE_CHARS = 44


def _wrapping(label: Label) -> None:
    """Let a long text label wrap to the dock's width instead of widening it."""
    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)


def _is_point_prompt(kind: str) -> bool:
    """Whether a prompt type gives the decoder a point (the prompt table says)."""
    return kind in PROMPT_RULES and PROMPT_RULES[kind].shape == "point"


def _row(*widgets, labels: bool = False) -> Container:
    """Controls side by side, flush with the rows above and below."""
    row = Container(widgets=list(widgets), layout="horizontal", labels=labels)
    row.native.layout().setContentsMargins(0, 0, 0, 0)
    return row


def _section(title: str, *widgets) -> tuple[QCollapsible, Container]:
    """A collapsible section (click its title to fold it) holding a magicgui container."""
    box = QCollapsible(title, expandedIcon="▼", collapsedIcon="▶")
    box.setDuration(0)
    box.content().layout().setContentsMargins(0, 0, 0, 0)
    cont = Container(widgets=list(widgets))
    cont.native.layout().setContentsMargins(0, 0, 0, 0)
    box.addWidget(cont.native)
    box.expand(animate=False)
    return box, cont


def _same_grid(a, b) -> bool:
    """Two results of the same volume grid and slicing (a moved point means the same there)."""
    return a.volume.shape == b.volume.shape and a.axis == b.axis and a.n_slices == b.n_slices


def _file_list_summary(paths) -> str:
    """'3 files: normal_01.nii.gz, ... in /folder' (names readable where the line edit cuts them)."""
    from pathlib import Path

    ps = [Path(str(p)) for p in (paths or ()) if str(p) not in ("", ".")]
    if not ps:
        return "no normal volumes chosen"
    names = ", ".join(p.name for p in ps[:6]) + (f", ... (+{len(ps) - 6})" if len(ps) > 6 else "")
    folders = {str(p.parent) for p in ps}
    where = f" in {folders.pop()}" if len(folders) == 1 else f" in {len(folders)} folders"
    return f"{len(ps)} file{'s' if len(ps) != 1 else ''}: {names}{where}"


class MiasSamWidget(BankMixin, DatasetMixin, FilesMixin, QWidget):
    """Dock widget of napari-mias-sam (Plugins > MIAS-SAM, or Layers > Segment > MIAS-SAM)."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        avoid_triton_llvm_crash()
        self.viewer = napari_viewer
        self.bank = None
        self.backbone = None
        self.backbone_key: Optional[tuple] = None
        self.live: Optional[LiveController] = None
        self.job: Optional[Job] = None
        self.use_cache = True
        self._pinned = False  # a backbone given by use_backbone() overrides the controls

        # -- model ------------------------------------------------------------------------------
        self.backbone_choice = ComboBox(choices=BACKBONES, value=defaults.BACKBONE, label="backbone",
                                        tooltip="litemedsam: weights bundled, runs on a CPU; sam-vit_*: pick the SAM checkpoint file")
        self.checkpoint = FileEdit(mode="r", filter="*.pth *.pt", label="checkpoint", enabled=False,
                                   tooltip="SAM weights file (e.g. sam_vit_b_01ec64.pth); LiteMedSAM needs none")
        self.device = ComboBox(choices=DEVICES, value="auto", label="device", tooltip="auto: CUDA, else Apple MPS, else CPU")
        from ..backbones.weights import registry

        self.weights_choice = ComboBox(choices=list(registry()), value="sam-vit_b", label="known weights",
                                       tooltip="official SAM ViT-B/L/H and MedSAM ViT-B checkpoints, checked against their published hashes")
        self.fetch_btn = PushButton(text="Download and verify",
                                    tooltip="download the chosen checkpoint into the user cache folder (needs internet) and select it")
        # -- bank -------------------------------------------------------------------------------
        self.normal_files = FileEdit(mode="rm", filter="*.nii *.nii.gz", label="normal volumes",
                                     tooltip="lesion-free NIfTI volumes for the memory bank")
        self.normals_info = Label(value="no normal volumes chosen")
        self.normal_folder = FileEdit(mode="d", label="or a folder", tooltip="a folder of normal NIfTI volumes, or a BMAD dataset folder")
        self.preprocess = ComboBox(choices=sorted(PREPROCESS_PRESETS), value=defaults.PREPROCESS, label="intensities")
        self.layout_choice = ComboBox(choices=PATCH_LAYOUTS, value=defaults.PATCH_LAYOUT, label="patch features")
        self.sample_normals_btn = PushButton(text="Use sample normals")
        self.build_btn = PushButton(text="Build bank")
        self.bank_path = FileEdit(mode="d", label="bank folder")
        self.load_btn = PushButton(text="Load bank")
        self.save_btn = PushButton(text="Save bank")
        self.bank_info = Label(value="no memory bank loaded")
        dataset_controls = self._make_dataset_controls()
        # -- run --------------------------------------------------------------------------------
        self.image = ComboBox(choices=self._image_choices, label="image layer")
        self.prompt = ComboBox(choices=PROMPT_TYPES, value=VOLUME_PROMPT or default_prompt_for(defaults.BACKBONE), label="prompt")
        self.prompt_note = Label(value="")
        self.gamma = FloatSlider(value=defaults.GAMMA, min=defaults.GAMMA_RANGE[0], max=defaults.GAMMA_RANGE[1],
                                 step=defaults.GAMMA_STEP, label="gamma",
                                 tooltip="centre-of-gravity exponent: higher pulls the prompt to the strongest anomaly")
        self.mask = RadioButtons(choices=[1, 2, 3], value=default_mask_for(self.prompt.value), orientation="horizontal", label="mask",
                                 tooltip="SAM's three masks, coarse (1) to fine (3); the paper uses 3")
        self.iou_info = Label(value="predicted IoU: -")
        self.normalisation = ComboBox(choices=NORMALISATIONS, value=defaults.NORMALISATION, label="normalisation")
        self.k = SpinBox(value=defaults.K, min=1, max=5, label="k neighbours")
        self.slice_decision = CheckBox(value=False, text="keep masks only on slices scored anomalous")
        self.batch_size = SpinBox(value=defaults.BATCH_SIZE, min=1, max=64, label="batch size")
        self.run_btn = PushButton(text="Run MIAS-SAM")
        self.cancel_btn = PushButton(text="Cancel", enabled=False)
        self.reset_points_btn = PushButton(text="Reset moved points")
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="")
        self.cache_info = Label(value="")
        # -- compare ----------------------------------------------------------------------------
        self.gt = ComboBox(choices=self._labels_choices, nullable=True, value=None, label="ground truth")
        compare_controls = self._make_compare_controls()
        self.show_errors = CheckBox(value=False, text="show false positives (yellow) / negatives (magenta)",
                                    tooltip="outlines of the mask's false positives and false negatives against the ground truth")
        self.dice_info = Label(value="Dice: choose a ground-truth Labels layer")
        self.counts_info = Label(value="")
        self._counts = self._live_state = ""
        self.message = MessageBar()
        self.profile = ProfilePlot()
        self.next_btn = PushButton(text="Next most anomalous slice")
        # -- review -----------------------------------------------------------------------------
        self.review_info = Label(value="run MIAS-SAM, then review each slice's prompt from the keyboard (a, r, u, n, b)")
        self.results_folder = FileEdit(mode="d", label="results folder",
                                       tooltip="where 'Save results' writes <stem>_mask.nii.gz, _anomaly.nii.gz, _points.csv and _qa.csv")
        self.save_results_btn = PushButton(text="Save results",
                                           tooltip="the reviewed mask (rejected slices cleared), the anomaly map and the review (<stem>_qa.csv)")

        for lab in (self.bank_info, self.normals_info, self.prompt_note, self.iou_info, self.status, self.dice_info,
                    self.counts_info, self.cache_info, self.review_info):
            _wrapping(lab)
        self.prompt_note.visible = False
        boxes = [
            _section("Model", self.backbone_choice, self.checkpoint, self.device, _row(self.weights_choice, self.fetch_btn)),
            _section("Memory bank", self.normal_files, self.normals_info, self.normal_folder, self.preprocess,
                     self.layout_choice,
                     _row(self.sample_normals_btn, self.build_btn), *dataset_controls, self.bank_path, _row(self.load_btn, self.save_btn),
                     self.bank_info, self.cache_info),
            _section("Run", self.image, self.ct_window, self.prompt, self.prompt_note, self.gamma, self.mask, self.iou_info,
                     self.normalisation, _row(self.k, self.batch_size, labels=True), self.slice_decision,
                     _row(self.run_btn, self.cancel_btn, self.reset_points_btn),
                     self.progress, self.status, self.counts_info),
            _section("Compare with ground truth", self.gt, *compare_controls, self.show_errors, self.dice_info),
            _section("Review prompts", self.review_info, self.results_folder, self.save_results_btn),
            _section("Lesions"),
        ]
        self._containers = [c for _, c in boxes]
        self.sections = {box.text(): box for box, _ in boxes}  # by title (a folded bank section adds its summary)
        inner = QWidget()
        lay = QVBoxLayout(inner)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.setSpacing(0)
        for box, _ in boxes:
            lay.addWidget(box)
        self.lesions = LesionPanel(self)
        boxes[-1][0].addWidget(self.lesions)
        boxes[-1][0].collapse(animate=False)  # unfolded on demand: the dock keeps the live QA in view
        compare_box = boxes[-3][0]
        compare_box.addWidget(self.profile)
        compare_box.addWidget(self.next_btn.native)
        lay.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # wrap to the dock's width
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.message)  # above the sections: always in view
        outer.addWidget(scroll)
        self.setMinimumWidth(440)
        self.scroll = scroll
        self._prompt_tooltips()
        self._mask_tooltip()

        # Live changes apply at once; the 0 ms timer gathers the events of one control change (and a
        # prompt change that also sets the mask) into one pass.
        self._settings_timer = QTimer(self)
        self._settings_timer.setSingleShot(True)
        self._settings_timer.setInterval(0)  # coalesces one burst of events; a newer value supersedes a running pass
        self._settings_timer.timeout.connect(self._apply_live_settings)

        self.backbone_choice.changed.connect(self._on_backbone_changed)
        for w in (self.backbone_choice, self.checkpoint, self.device):
            w.changed.connect(self._unpin)
        self.sample_normals_btn.changed.connect(self.use_sample_normals)
        self.fetch_btn.changed.connect(self.fetch_weights)
        self.refresh_cache_info()
        self.build_btn.changed.connect(self.build_bank)
        self.load_btn.changed.connect(self.load_bank)
        self.save_btn.changed.connect(self.save_bank)
        self.run_btn.changed.connect(self.run)
        self.cancel_btn.changed.connect(self.cancel)
        self.reset_points_btn.changed.connect(self.reset_points)
        self.save_results_btn.changed.connect(self.save_results)
        # Gamma and the mask apply at once: the decode starts while the dock repaints the control
        # (about 30 ms of software painting on 2 cores, measured); a prompt change waits for the
        # 0 ms timer, which gathers it with the mask it sets.
        for w in (self.gamma, self.mask):
            w.changed.connect(lambda *_: self._apply_live_settings_now())
        for w in (self.prompt, self.normalisation, self.k, self.slice_decision):
            w.changed.connect(lambda *_: self._settings_timer.start())
        self.prompt.changed.connect(self._prompt_hint)
        self.prompt.changed.connect(self._prompt_mask)
        self.normal_files.changed.connect(self._show_normals)
        self.gt.changed.connect(self._on_gt_selected)
        self.gt.changed.connect(self._on_compare_changed)
        self.show_errors.changed.connect(self._on_compare_changed)
        self.profile.slice_clicked.connect(self._jump)
        self.next_btn.changed.connect(self._next_anomalous)
        self.viewer.dims.events.current_step.connect(self._on_step)
        for ev in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, ev).connect(self.reset_choices)

    # -- helpers --------------------------------------------------------------------------------
    def reset_choices(self, *_args) -> None:
        for c in self._containers:
            c.reset_choices()

    def _image_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, napari.layers.Image) and not is_output_layer(layer)]

    def _labels_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, napari.layers.Labels) and not is_output_layer(layer)]

    def current_settings(self) -> SegmentSettings:
        return SegmentSettings(
            gamma=on_gamma_grid(float(self.gamma.value), keep=self.live.session.settings.gamma if self.live is not None else None), mask_index=int(self.mask.value), prompt=str(self.prompt.value),
            k=int(self.k.value), normalisation=str(self.normalisation.value), slice_decision=bool(self.slice_decision.value),
        )

    def selected_backbone_key(self, encoding: str = "standard") -> tuple:
        """(backbone, checkpoint, device, encoding) the controls select (or the pinned backbone's);
        ``encoding``: a run takes its bank's (a SAM bank built with ``--encoding reference`` runs as
        the paper's code). A one-line :class:`InputError` when a SAM backbone has no checkpoint file."""
        if self._pinned and self.backbone is not None and self.backbone_key is not None:
            return self.backbone_key
        name = str(self.backbone_choice.value)
        ckpt = path_or_none(self.checkpoint.value) if name != "litemedsam" else None
        if name != "litemedsam" and ckpt is None:
            from ..backbones.weights import local_file

            ckpt = local_file(name)  # downloaded earlier (Download and verify, or mias-sam weights fetch)
        if name != "litemedsam" and ckpt is None:
            raise InputError(f"{name} needs its checkpoint file: pick it in 'checkpoint' (e.g. sam_vit_b_01ec64.pth) "
                             "or download it with 'Download and verify'.")
        return (name, str(ckpt) if ckpt else None, str(self.device.value), encoding)

    def use_backbone(self, backbone, device: str = "cpu") -> None:
        """Use an already loaded backbone (scripts and tests); sets the controls to match it. It stays
        in use until the backbone, checkpoint or device control is changed."""
        if backbone.name in BACKBONES:
            self.backbone_choice.value = backbone.name
        self.device.value = device
        self.backbone = backbone
        self.backbone_key = (backbone.name, str(getattr(backbone, "weights_path", "")) or None, device, encoding_of(backbone))
        self._pinned = True

    def get_backbone(self, key: tuple, progress):
        """The backbone for ``key`` (runs in the worker thread; loads it when needed)."""
        if self.backbone is not None and self.backbone_key == key:
            return self.backbone
        avoid_triton_llvm_crash()
        from ..backbones import load_backbone

        progress(f"load {key[0]}", 0, 1)
        bb = load_backbone(key[0], key[1], None if key[2] == "auto" else key[2], encoding=key[3])
        progress(f"load {key[0]}", 1, 1)
        return bb

    def _unpin(self, *_args) -> None:
        self._pinned = False

    def volume_default_prompt(self) -> str:
        """The prompt a volume gets by default with the selected backbone and the bank in use:
        regions when the bank holds enough held-out normal slices for its levels (or no bank is
        loaded yet), else the backbone's per-slice prompt."""
        ok = self.bank is None or regions_supported(self.bank)
        return str(resolve_defaults(SegmentSettings(), str(self.backbone_choice.value), regions_ok=ok).prompt)

    def _on_backbone_changed(self, name: str) -> None:
        self.checkpoint.enabled = name != "litemedsam"
        self.prompt.value = self.volume_default_prompt()
        self._prompt_tooltips()
        self._mask_tooltip()
        self._prompt_hint(self.prompt.value)
        if self.live is not None:
            self.live.on_slice_changed()

    def _point_prompts_work(self) -> bool:
        return point_prompts_work_for(str(self.backbone_choice.value))

    def iou_tracks_quality(self) -> bool:
        """Whether the selected backbone's predicted IoU says anything about a mask's quality."""
        return iou_tracks_quality_for(str(self.backbone_choice.value))

    def _prompt_tooltips(self) -> None:
        """Each prompt type's tooltip in the drop-down says what it is and whether it suits the backbone."""
        box_only = not self._point_prompts_work()
        name = str(self.backbone_choice.value)
        combo = self.prompt.native
        for i in range(combo.count()):
            kind = combo.itemText(i)
            tip = PROMPT_RULES[kind].description if kind in PROMPT_RULES else kind
            if box_only and _is_point_prompt(kind):
                tip += f". Not for {name}: it was trained with box prompts only, a point gives near-empty masks."
            combo.setItemData(i, tip, Qt.ItemDataRole.ToolTipRole)

    def _mask_tooltip(self) -> None:
        tip = ("SAM's three masks, coarse (1) to fine (3); the paper uses 3 with its per-slice prompts, the regions "
               "prompt uses 1 (clipped to its region).")
        if not self.iou_tracks_quality():
            tip += (f" {self.backbone_choice.value}'s IoU head does not track mask quality (it reads about the "
                    "same for empty, leaking and good masks), so its predicted IoU is not shown.")
        else:
            tip += " Each mask's predicted IoU for the current slice is shown below."
        self.mask.tooltip = tip

    def _prompt_mask(self, value: str) -> None:
        """Choosing a prompt type selects its default mask (1 for regions, the paper's 3 otherwise);
        pick another mask after it."""
        self.mask.value = default_mask_for(str(value))

    def _prompt_hint(self, value: str) -> None:
        """A note under the prompt choice that stays while a point prompt is used on a box-only backbone."""
        if not self._point_prompts_work() and PROMPT_RULES[value].shape == "point":
            self.prompt_note.value = (f"⚠ {self.backbone_choice.value} was trained with box prompts only: "
                                      f"{value} gives near-empty masks. Use cog-box.")
            self.prompt_note.native.setStyleSheet("color: #f0b040;")
            self.prompt_note.visible = True
        else:
            self.prompt_note.value = ""
            self.prompt_note.visible = False

    def _show_normals(self, *_args) -> None:
        self.normals_info.value = _file_list_summary(self.normal_files.value)

    # -- messages ---------------------------------------------------------------------------------
    def show_message(self, text: str, level: str = "info") -> None:
        """A message that stays in the dock (above the sections) until it is replaced or cleared."""
        self.message.show_message(text, level)

    def report_error(self, text: str) -> None:
        """A user error: its full text in the dock, and a notification."""
        self.message.show_message(text, "error")
        show_error(f"MIAS-SAM: {text}")

    def show_counts(self, text: str) -> None:
        """How many slices kept a mask (after a run and after every live update)."""
        self._counts = text
        self._show_live_info()

    def show_live_state(self, text: str) -> None:
        """Where the live updates stand ("updating slices...", "up to date"); the run's status stays."""
        self._live_state = text
        self._show_live_info()

    def _show_live_info(self) -> None:
        state = f"live updates: {self._live_state}" if self._live_state else ""
        self.counts_info.value = "; ".join(t for t in (self._counts, state) if t)

    def fold_bank_section(self, summary: str = "") -> None:
        """Fold the memory-bank section (a bank is in use: make room for the QA); its title keeps
        a one-line summary of the bank."""
        sec = self.sections["Memory bank"]
        title = "Memory bank" + (f": {summary}" if summary else "")
        # a long title (a bank named after its content hash) would widen the whole dock: elide it,
        # the full text stays in the tooltip
        sec.setText(title if len(title) <= TITLE_CHARS else title[:TITLE_CHARS - 1] + "…")
        sec.setToolTip(title)
        sec.collapse(animate=False)

    def _busy(self, busy: bool) -> None:
        for b in (self.build_btn, self.build_ds_btn, self.load_btn, self.save_btn, self.run_btn):
            b.enabled = not busy
        self.cancel_btn.enabled = busy

    def start_job(self, func, on_done) -> Optional[Job]:
        """Run ``func(progress, cancelled)`` in the background, then ``on_done(value)`` on the
        GUI thread (``value`` is a :class:`Failed` when it raised); ``None`` while busy."""
        if self.job is not None and not self.job.done:
            self.report_error("MIAS-SAM is busy with another job; wait for it or cancel it.")
            return None
        self._busy(True)
        self.progress.value = 0
        self.job = Job(func, on_done=on_done, on_progress=self._on_progress, on_finished=partial(self._busy, False))
        return self.job.start()

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        self.progress.max = max(int(total), 1)
        self.progress.value = min(int(done), int(total))
        self.status.value = f"{stage}: {done}/{total}"

    def job_failed(self, what: str, value) -> bool:
        """Report a failed or cancelled job (status line and notification); ``True`` if it was."""
        if not isinstance(value, Failed):
            self.message.clear("error")
            return False
        if isinstance(value.exc, Cancelled):
            self.status.value = f"{what} cancelled; nothing was changed."
            show_info(f"MIAS-SAM: {what} cancelled; nothing was changed.")
        else:
            self.status.value = f"{what} failed."
            self.report_error(f"{what} failed: {value.exc}")
        return True

    def settings_pending(self) -> bool:
        """Whether a settings change is waiting to be applied to the live result."""
        return self._settings_timer.isActive()

    def cancel(self) -> None:
        if self.job is not None and not self.job.done:
            self.status.value = "cancelling..."
            self.job.cancel()

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> Optional[Job]:
        """Segment the selected image layer in the background; layers are added when it finishes.
        The run path of ``mias-sam segment`` (:mod:`napari_mias_sam.jobs.run`): every check first,
        here; the backbone checked against the bank once (here when it is loaded, else in the job)."""
        from ..data.checks import check_voxel_dtype
        from ..jobs.dataset_runs import sequences_for_bank
        from ..jobs.run import RunInput, prepare_run
        from .models.layers import volume_from_layer
        from .writer import layer_data_to_world

        try:
            layer = self.image.value
            if layer is None or not isinstance(layer, napari.layers.Image):
                raise InputError("choose an Image layer holding a 3D volume (File > Open a .nii.gz, or File > Open Sample > MIAS-SAM).")
            if layer.rgb:
                raise InputError(f"layer '{layer.name}' is RGB; MIAS-SAM needs a single-channel 3D volume.")
            if self.bank is None:
                raise InputError("no memory bank: build one from normal volumes (Memory bank > Build bank) "
                                 "or load a saved bank folder (Load bank) first.")
            key = self.selected_backbone_key(encoding_of(self.bank.backbone))
            if getattr(layer.data, "dtype", None) is not None:  # the CLI's checks, before any work
                check_voxel_dtype(layer.data.dtype, f"layer '{layer.name}'")
            volume, axes = volume_from_layer(layer.data, layer.metadata, layer_data_to_world(layer), name=layer.name)
            # the backbone's name against the bank's, the device, the ROI, the volume, the search's memory; a
            # multi-sequence bank's other sequences read from the volume's case folder
            bank = self.bank
            source = RunInput(f"layer '{layer.name}'", lambda: (sequences_for_bank(volume, bank.manifest), None))
            prepared = prepare_run(bank, [source], self.current_settings(), backbone=key[0], device=key[2])
            setup = prepared.start(self.backbone) if (self.backbone is not None and self.backbone_key == key) else None
        except (MiasSamError, ValueError) as exc:
            self.report_error(str(exc))
            return None
        from ..jobs.run import run
        from ..pipeline.embedding_cache import EmbeddingCache

        batch, cache = int(self.batch_size.value), (EmbeddingCache() if self.use_cache else None)
        previous = self.live.session.result if (self.live is not None and self.live.source is layer) else None
        decoder = self.live.session.decoder if self.live is not None else None  # remembers the decodes of earlier runs
        if self.live is not None:
            self.live.stop_prefetch()  # the run has both cores

        def job(progress, cancelled):
            from dataclasses import replace

            from ..pipeline.decode_cache import CachedDecoder

            bb = self.get_backbone(key, progress)
            dec = decoder if (decoder is not None and decoder.backbone is bb) else CachedDecoder(bb)
            run_setup = replace(setup or prepared.start(bb), backbone=dec)  # decodes remembered for the live updates
            res, _ = run(prepared, run_setup, prepared.inputs[0], cache=cache, reuse=previous,
                         batch_size=batch, progress=progress, cancelled=cancelled)
            if cancelled():
                raise Cancelled("cancelled by the user")
            # napari's Points/Labels layers import pandas and scipy.linalg on first use: do it here,
            # off the GUI thread, so adding the output layers pauses the viewer less.
            import pandas  # noqa: F401
            import scipy.linalg  # noqa: F401

            return dec, key, res

        self.status.value = f"running on '{layer.name}'..."
        return self.start_job(job, partial(self._run_done, layer, axes))

    def _run_done(self, layer, axes, value) -> None:
        if self.job_failed("the run", value):
            return
        backbone, self.backbone_key, result = value
        previous = self.live if (self.live is not None and self.live.source is layer) else None
        same = previous is not None and _same_grid(previous.session.result, result)
        moved = previous.session.overrides if same else {}
        self.show_result(result, layer, backbone, axes, moved_points=moved, statuses=previous.session.statuses if same else None)
        restored = self.live.review.restore_opened() if previous is None else ""
        t = result.timings
        how = ("anomaly maps reused" if result.maps_reused else
               "embeddings from the cache" if result.encoded.from_cache else "")
        took = sum(t.values())
        kept = f"; {plural(len(moved), 'moved point')} kept (Reset moved points drops them)" if moved else ""
        kept += restored
        self.status.value = (f"done in {took:.1f} s{f' ({how})' if how else ''}{kept}. Tune gamma, the mask and "
                             f"the prompt, or drag a CoG point.")
        self.message.clear("warning")
        self._prompt_hint(self.prompt.value)
        self.progress.value = self.progress.max

    def show_result(self, result, layer, backbone, axes=None, *, moved_points: Optional[dict] = None,
                    statuses: Optional[dict] = None) -> "LiveController":
        """Show a :class:`~napari_mias_sam.pipeline.segment.SegmentationResult` of ``layer`` (from a run
        here or from a script) as the output layers, and start live QA on it. ``moved_points``
        (slice -> model-frame (x, y)), e.g. from the previous run, are re-applied and re-decoded, and
        the review ``statuses`` (slice -> status) carried (rejected slices stay cleared)."""
        from ..pipeline.decode_cache import CachedDecoder
        from .models.live import LiveSession
        from .models.layers import volume_from_layer

        if axes is None:
            axes = volume_from_layer(layer.data, layer.metadata, None, name=layer.name, dtype=None)[1]
        decoder = backbone if isinstance(backbone, CachedDecoder) else None  # a run's: it holds the run's decodes
        backbone = decoder.backbone if decoder is not None else backbone
        self.backbone = backbone
        previous = self.live
        if decoder is None and previous is not None:
            decoder = previous.session.decoder
        if previous is not None:
            previous.close()
        for w, v in ((self.gamma, result.settings.gamma), (self.mask, result.settings.mask_index),
                     (self.prompt, result.settings.prompt)):
            with w.changed.blocked():
                w.value = v
        same = previous is not None and previous.source == layer
        session = LiveSession(result, backbone, axes, overrides=moved_points, statuses=statuses, decoder=decoder)
        self.live = LiveController(self, session, layer, previous=previous if same else None)
        if session.stale:  # the moved points: decode those slices with them
            self.live.refresh(order=sorted(session.stale))
        else:
            self.show_counts(self.live.counts_text())
        return self.live

    # -- live QA (delegated to the controller) -------------------------------------------------------
    def _apply_live_settings_now(self) -> None:
        self._settings_timer.stop()
        self._apply_live_settings()

    def _apply_live_settings(self) -> None:
        if self.live is not None:
            self.live.apply_settings(self.current_settings())

    def reset_points(self) -> None:
        if self.live is not None:
            self.live.reset_points()

    def _on_step(self, _event=None) -> None:
        if self.live is not None:
            self.live.on_slice_changed()

    def _on_compare_changed(self, *_args) -> None:
        if self.live is not None:
            self.live.update_compare(full=True)
            self.live.review.update_qa()

    # -- review ---------------------------------------------------------------------------------
    def save_results(self) -> Optional[dict]:
        """'Save results': the reviewed mask, the anomaly map, <stem>_points.csv, the lesions (less
        the rejected ones) and <stem>_qa.csv."""
        if self.live is None:
            self.report_error("nothing to save yet: run MIAS-SAM on an image layer first.")
            return None
        panel = self.lesions
        lesions = panel.lesion_set()
        return self.live.review.save(lesions, panel.model.qa_fields() if lesions is not None else None)

    def _jump(self, s: int) -> None:
        if self.live is not None:
            self.live.jump_to(int(s))

    def _next_anomalous(self) -> None:
        if self.live is not None:
            self.live.next_anomalous()

    def closeEvent(self, event) -> None:  # noqa: N802
        self.cancel()
        if self.live is not None:
            self.live.close()
        super().closeEvent(event)

