"""The files the widget keeps for the user: known SAM / MedSAM checkpoints (download and verify,
as ``mias-sam weights fetch``) and the embedding cache folder (shown with its size and limit, as
``mias-sam cache info``). A mixin of :class:`~napari_mias_sam._widget.MiasSamWidget`."""

from __future__ import annotations

from pathlib import Path

from napari.utils.notifications import show_info

__all__ = ["FilesMixin", "cache_summary", "display_path"]


def display_path(path) -> str:
    """A path as shown in the widget: the home folder written as ``~``."""
    path = Path(path)
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def cache_summary() -> str:
    """One line: where the embedding cache is, its size and its limit."""
    from ..pipeline.embedding_cache import EmbeddingCache
    from ..core.machine import human_bytes

    info = EmbeddingCache().info()
    return (f"embedding cache: {display_path(info['folder'])} ({info['entries']} entries, {human_bytes(info['bytes'])} "
            f"of {human_bytes(info['max_bytes'])}; mias-sam cache info|clear|limit)")


class FilesMixin:
    """Weights download and cache display (uses the widget's controls and job runner)."""

    def fetch_weights(self):
        """Download the checkpoint chosen in 'known weights' in the background, verify its hash,
        then select its backbone and file."""
        from ..backbones.weights import fetch

        name = str(self.weights_choice.value)
        self.status.value = f"downloading {name}..."

        def job(progress, cancelled):
            progress(f"download {name}", 0, 1)
            return name, fetch(name)

        return self.start_job(job, self._weights_fetched)

    def _weights_fetched(self, value) -> None:
        if self.job_failed("the download", value):
            return
        from ..backbones.weights import registry

        name, path = value
        entry = registry()[name]
        self.backbone_choice.value = entry.backbone
        self.checkpoint.value = Path(path)
        self.status.value = f"{entry.title}: {path} (hash verified)"
        self.progress.value = self.progress.max
        show_info(f"MIAS-SAM: {entry.title} downloaded and verified.")

    def refresh_cache_info(self) -> None:
        try:
            self.cache_info.value = cache_summary()
        except OSError as exc:
            self.cache_info.value = f"embedding cache: unavailable ({exc})"
