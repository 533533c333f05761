"""The napari plugin: the dock widget and its parts, the NIfTI reader and writers, the sample data,
and the Qt-free models behind them (``layers``: NIfTI <-> layer data; ``live``: live QA session).

Only the ``widget*``, ``reader``, ``writer`` and ``samples`` modules import napari, Qt or magicgui;
nothing is imported here eagerly, so ``viewer.layers`` and ``viewer.live`` load without Qt."""
