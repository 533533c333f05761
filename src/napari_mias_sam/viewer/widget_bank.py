"""The memory-bank part of the MIAS-SAM widget: build from normal volumes (files, a folder, or
the bundled sample normals), load, save, and show where the bank came from.

:class:`BankMixin` uses only what :class:`BankHost` declares (a test checks it)."""

from pathlib import Path
from typing import Any, Callable, Optional, Protocol, runtime_checkable

from ..core.paths import sample_data_dir
from ..backbones import BACKBONES
from ..core.errors import InputError, MiasSamError
from ..method.regions import bank_levels, no_regions_reason, regions_supported

__all__ = ["BankHost", "BankMixin", "path_or_none"]


@runtime_checkable
class BankHost(Protocol):
    """What :class:`BankMixin` needs from the widget it is mixed into: its controls, the bank and
    backbone it holds, and four methods. Nothing else (no private attributes)."""

    bank: Any
    backbone: Any
    backbone_key: Optional[tuple]
    status: Any
    bank_info: Any
    bank_path: Any
    normal_files: Any
    normal_folder: Any
    preprocess: Any
    layout_choice: Any
    batch_size: Any
    backbone_choice: Any
    prompt: Any

    def start_job(self, func: Callable, on_done: Callable) -> Any: ...

    def job_failed(self, what: str, value: Any) -> bool: ...

    def selected_backbone_key(self, encoding: str = "standard") -> tuple: ...

    def get_backbone(self, key: tuple, progress: Callable) -> Any: ...

    def report_error(self, text: str) -> None: ...

    def volume_default_prompt(self) -> str: ...

    def fold_bank_section(self, summary: str = "") -> None: ...


def path_or_none(value):
    """A path from a file control's value; ``None`` for an empty one."""
    if value is None:
        return None
    s = str(value)
    return None if s in ("", ".") else Path(s)


class BankMixin:
    """Bank actions of :class:`~napari_mias_sam.viewer.widget.MiasSamWidget` (uses its controls)."""

    def set_bank(self, bank) -> None:
        """Use a memory bank (built, loaded, or given by a script)."""
        self.bank = bank
        from .widget_files import display_path

        where = f"\nfolder: {display_path(bank.path)}" if bank.path else "\nnot saved yet"
        self.bank_info.value = bank.summary() + where + f"\ncreated {bank.manifest.get('created')}" + _levels_line(bank)
        saved = Path(bank.path).name if bank.path else "not saved"
        self.fold_bank_section(f"{bank.ntotal:,} patches, {bank.backbone.get('name')} ({saved})")
        if self.prompt.value == "regions" and not regions_supported(bank):  # too few normal slices for its levels
            self.prompt.value = self.volume_default_prompt()

    def use_sample_normals(self) -> None:
        normals = sorted(sample_data_dir().glob("normal_*.nii.gz"))
        if not normals:
            self.report_error(f"no sample normal volumes in {sample_data_dir()}.")
            return
        self.normal_files.value = tuple(normals)
        self.preprocess.value = "mri"

    def build_bank(self) -> None:
        try:
            inputs = [Path(p) for p in (self.normal_files.value or ()) if path_or_none(p)]
            folder = path_or_none(self.normal_folder.value)
            if folder is not None:
                inputs.append(folder)
            if not inputs:
                raise InputError("choose normal (lesion-free) volumes or a folder of them to build the memory bank from.")
            key = self.selected_backbone_key()
        except MiasSamError as exc:
            self.report_error(str(exc))
            return
        from ..method.preprocess import PREPROCESS_PRESETS as presets
        from ..jobs.bank_builds import build_bank_from_files

        prep, layout, batch = presets[self.preprocess.value], self.layout_choice.value, int(self.batch_size.value)

        def job(progress, cancelled):
            bb = self.get_backbone(key, progress)
            bank = build_bank_from_files(inputs, bb, preprocessing=prep, layout=layout, batch_size=batch,
                                         progress=progress, cancelled=cancelled)
            return bb, key, bank

        self.start_job(job, self._bank_built)

    def _bank_built(self, value) -> None:
        if self.job_failed("bank build", value):
            return
        self.backbone, self.backbone_key, bank = value
        self.set_bank(bank)
        self.status.value = f"memory bank built: {bank.ntotal:,} patches. Save it to reuse it."

    def load_bank(self) -> None:
        path = path_or_none(self.bank_path.value)
        if path is None:
            self.report_error("choose the bank folder to load (bank folder), then press Load bank.")
            return
        from ..bank import load_bank

        self.start_job(lambda progress, cancelled: load_bank(path), self._bank_loaded)

    def _bank_loaded(self, value) -> None:
        if self.job_failed("loading the bank", value):
            return
        self.set_bank(value)
        self.status.value = f"memory bank loaded from {value.path}"
        if value.backbone.get("name") in BACKBONES and value.backbone.get("name") != self.backbone_choice.value:
            self.backbone_choice.value = value.backbone["name"]

    def save_bank(self) -> None:
        path = path_or_none(self.bank_path.value)
        if self.bank is None:
            self.report_error("no memory bank to save; build one first.")
            return
        if path is None:
            self.report_error("choose the folder to save the bank to (bank folder), then press Save bank.")
            return
        bank = self.bank

        def job(progress, cancelled):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()  # an empty folder picked in the dialog: the bank takes its place
            return bank.save(path)

        self.start_job(job, self._bank_saved)

    def _bank_saved(self, value) -> None:
        if self.job_failed("saving the bank", value):
            return
        self.set_bank(self.bank)
        self.status.value = f"memory bank saved to {value}"


def _levels_line(bank) -> str:
    """The bank's region levels for the bank box: how they are placed (peaks of >= 34 held-out
    slices, or a small bank's pixel percentiles), or why volumes get the per-slice prompt."""
    if not regions_supported(bank):
        return f"\nvolumes: {no_regions_reason(bank)}"
    try:
        return f"\nregion levels: {bank_levels(bank).describe()}"
    except ValueError as exc:
        return f"\nregion levels: none ({exc})"
