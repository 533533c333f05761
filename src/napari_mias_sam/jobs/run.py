"""One preflight-and-run for segmentation: ``mias-sam segment`` (NIfTI volumes, case folders, PNG
slices) and the widget's Run both go through :func:`prepare_run`, :meth:`PreparedRun.start` and
:func:`run`.

:func:`prepare_run` makes every check before any work, each once: the device exists and the
precision suits it (:func:`check_machine`, unless already done); the chosen backbone is the bank's
(by name, before any model loads); a PNG call's bank is one of PNG slices; each input is read
once, masked to the bank's ROI (the one place a run applies it: :func:`roi_for_bank`) and checked
against the bank (affine, slice size, intensities, without normalising them); the
nearest-neighbour search of the largest fits in memory. Every input is checked before the first
one runs, so a bad later file never stops a batch half-way.

:meth:`PreparedRun.start` checks the loaded backbone against the bank (``check_compatible``) and
makes the settings concrete, once per call
(:func:`~napari_mias_sam.pipeline.segment.setup_run`); :func:`run` segments one prepared input
with it. The image the preflight read is handed to the run, not read again (the first input's
always, the others' up to :data:`HOLD_BYTES` in all: a larger batch reads its later volumes
again), and the pipeline normalises it, once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

from ..bank import MemoryBank, check_backbone_name
from ..core import defaults
from ..core.errors import InputError
from ..core.progress import CancelFn, ProgressFn
from ..data.checks import about
from ..data.datasets import Case, case_for_file
from ..data.volumes import Volume, load_labels
from ..method.reference_encoding import encoding_of
from ..pipeline.embedding_cache import EmbeddingCache
from ..pipeline.segment import RunSetup, SegmentationResult, setup_run
from ..pipeline.settings import SegmentSettings
from .dataset_runs import apply_roi
from .png_runs import check_png_bank, encode_png_stack
from .preflight import check_device, check_knn_memory, check_precision, check_volume_for_bank

__all__ = ["HOLD_BYTES", "CheckedDevice", "check_machine", "roi_for_bank", "RunInput", "PreparedRun", "prepare_run", "run"]

#: Images read by the preflight are kept for the run up to this many bytes in all (the first always).
HOLD_BYTES = 2 * 1024**3


class CheckedDevice(str):
    """A device :func:`check_machine` accepted with a precision (not checked again)."""

    precision: str = "fp32"


def check_machine(device: str | None, precision: str = "fp32") -> CheckedDevice:
    """The device exists on this machine and ``precision`` does not crawl on it (see
    :func:`~.preflight.check_device`, :func:`~.preflight.check_precision`)."""
    d = CheckedDevice(check_device(device))
    check_precision(precision, d)
    d.precision = precision
    return d


def roi_for_bank(volume: Volume, manifest: dict, *, labels: Volume | None = None, case: Case | None = None) -> Volume:
    """``volume`` masked the way the bank's slices were (``--roi``): with ``labels`` of ``case``
    when given (``segment``'s inputs), else with the segmentation of the dataset case the volume's
    file belongs to; unchanged when the bank has no ROI. The one place a run applies the ROI."""
    roi = (manifest.get("dataset") or {}).get("roi")
    if not roi:
        return volume
    if labels is not None and case is not None and roi in case.info.rois:
        return apply_roi(volume, labels, roi, case.info)
    case = case_for_file(volume.path) if volume.path is not None else None
    if case is None or roi not in case.info.rois or case.seg is None:
        raise InputError(f"the bank was built with --roi {roi}: open a {(manifest.get('dataset') or {}).get('layout')} "
                         f"volume whose segmentation lies beside it (volume-N with segmentation-N), so the {roi} can be "
                         "masked the same way.")
    return apply_roi(volume, load_labels(case.seg, like=volume), roi, case.info)


@dataclass
class RunInput:
    """One input of a run: a name for messages (a file, or ``layer 'x'``), how to read it (the image
    and its label volume, or None), the dataset case it belongs to (its ROI labels), and what the
    preflight found (:attr:`n_slices`; the image and labels it read)."""

    source: str
    read: Callable[[], tuple[Volume, Volume | None]]
    case: Case | None = None
    n_slices: int = 0
    _held: tuple[Volume, Volume | None] | None = field(default=None, repr=False)

    def take(self, bank: MemoryBank) -> tuple[Volume, Volume | None]:
        """The image as the run sees it (masked to ``bank``'s ROI) and its labels: the preflight's
        copy, handed over once; read again when it was not kept."""
        if self._held is not None:
            held, self._held = self._held, None
            return held
        image, labels = self.read()
        return roi_for_bank(image, bank.manifest, labels=labels, case=self.case), labels


@dataclass
class PreparedRun:
    """A run checked before any work (:func:`prepare_run`): the bank, the settings as asked (unset
    prompt and mask are made concrete by :meth:`start`), the checked device and precision, the
    backbone's name (the bank's unless another was chosen, checked against it), and the inputs."""

    bank: MemoryBank
    settings: SegmentSettings
    device: CheckedDevice
    backbone: str
    inputs: list[RunInput]
    axis: int | str | None = None
    slice_set: bool = False  # PNG slices: one stack of 2D images

    @property
    def precision(self) -> str:
        return self.device.precision

    @property
    def encoding(self) -> str:
        """How slices reach the encoder: the bank's (a run loads its backbone with it)."""
        return encoding_of(self.bank.backbone)

    def start(self, backbone) -> RunSetup:
        """Check the loaded ``backbone`` against the bank and make the settings concrete (once per run)."""
        return setup_run(self.bank, backbone, self.settings, slice_set=self.slice_set)


def prepare_run(
    bank: MemoryBank,
    inputs: list[RunInput],
    settings: SegmentSettings,
    *,
    backbone: str | None = None,
    device: str | CheckedDevice | None = "auto",
    precision: str = "fp32",
    axis: int | str | None = None,
    slice_set: bool = False,
) -> PreparedRun:
    """Every check of a run before any work (see the module docstring). ``device``: a device name,
    or what :func:`check_machine` returned (then ``precision`` is its). ``slice_set``: the inputs
    are PNG stacks (read and size-checked by their reader; the bank must be one of PNG slices)."""
    dev = device if isinstance(device, CheckedDevice) else check_machine(device, precision)
    name = backbone or bank.backbone["name"]
    check_backbone_name(bank, name)
    if slice_set:
        check_png_bank(bank)
    if not inputs:
        raise InputError("nothing to segment: no input volume.")
    held, most = 0, 0
    for inp in inputs:
        with contextlib.nullcontext() if slice_set else about(inp.source):  # a PNG reader names its files
            image, labels = inp.read()
            image = roi_for_bank(image, bank.manifest, labels=labels, case=inp.case)
            inp.n_slices = int(image.shape[0]) if slice_set else check_volume_for_bank(image, bank, axis, inp.source)
        size = image.data.nbytes + (labels.data.nbytes if labels is not None else 0)
        if held + size <= HOLD_BYTES or inp is inputs[0]:
            inp._held, held = (image, labels), held + size
        most = max(most, inp.n_slices)
    check_knn_memory(settings.k, most, bank.ntotal)
    return PreparedRun(bank=bank, settings=settings, device=dev, backbone=name, inputs=inputs, axis=axis,
                       slice_set=slice_set)


def run(
    prepared: PreparedRun,
    setup: RunSetup,
    inp: RunInput,
    *,
    cache: EmbeddingCache | None = None,
    reuse: SegmentationResult | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    progress: ProgressFn | None = None,
    cancelled: CancelFn | None = None,
) -> tuple[SegmentationResult, Volume | None]:
    """Segment one prepared input with ``setup`` (from :meth:`PreparedRun.start`); returns the
    result and the input's label volume (None without one)."""
    image, labels = inp.take(prepared.bank)
    if prepared.slice_set:
        encoded = encode_png_stack(image.data, setup.backbone, cache, batch_size=batch_size, progress=progress,
                                   cancelled=cancelled)
        res = setup.segment(image, axis=0, encoded=encoded, progress=progress, cancelled=cancelled)
    else:
        res = setup.segment(image, axis=prepared.axis, cache=cache, reuse=reuse, batch_size=batch_size, progress=progress,
                            cancelled=cancelled)
    return res, labels
