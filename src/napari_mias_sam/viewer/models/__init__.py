"""The Qt-free models behind the viewer: NIfTI volumes <-> layer data with exact geometry
(:mod:`.layers`), dataset cases as layers (:mod:`.case_layers`), the live QA session of one result
(:mod:`.live`) and its review as a QA table (:mod:`.review`). Nothing here imports napari or Qt."""
