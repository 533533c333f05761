"""The bundled sample volumes (NIfTI files beside this module), installed as
``napari_mias_sam.sample_data``. Find them with ``napari_mias_sam._paths.sample_data_dir()``
(importlib.resources), never by a path relative to a source checkout."""
