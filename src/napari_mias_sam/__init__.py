"""napari-mias-sam: threshold-free anomaly segmentation of 3D medical volumes (MIAS-SAM).

The public API is small; the CLI and the napari widget are thin layers over it::

    from napari_mias_sam import load_backbone, build_bank_from_files, load_bank, load_volume, segment_volume
"""

from __future__ import annotations

from ._version import __version__
from .backbones import load_backbone
from .bank import MemoryBank, build_bank, load_bank
from .data.volumes import Volume, load_labels, load_volume, save_nifti
from .pipeline.segment import SegmentationResult, segment_volume
from .method.preprocess import PREPROCESS_PRESETS, Preprocessing
from .pipeline.settings import SegmentSettings
from .jobs.bank_builds import build_bank_from_files
from .jobs.outputs import write_outputs


__all__ = [
    "__version__",
    "MemoryBank",
    "PREPROCESS_PRESETS",
    "Preprocessing",
    "SegmentSettings",
    "SegmentationResult",
    "Volume",
    "build_bank",
    "build_bank_from_files",
    "load_backbone",
    "load_bank",
    "load_labels",
    "load_volume",
    "save_nifti",
    "segment_volume",
    "write_outputs",
]
