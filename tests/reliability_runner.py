"""Runs ``mias-sam`` in a subprocess with the fake backbone (tests/fakes.py), for the
concurrency and kill tests of test_reliability_catalogue.py.

``python reliability_runner.py ARGS...`` = ``mias-sam ARGS...``. Environment:
``MIAS_TEST_SLEEP=S``: sleep S seconds when the backbone loads (keeps a run's claim held);
``MIAS_TEST_KILL=WHERE:N:SIGNAL``: send SIGNAL (TERM, INT or KILL) to this process on the N-th
call (1-based) of WHERE: ``save_nifti`` (a segment output written to its temporary file),
``write_index`` (a bank's index written into its temporary folder), ``commit`` (an output set about
to move into place), ``link`` / ``replace`` (one file or folder being moved into place).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import napari_mias_sam.backbones as backbones  # noqa: E402
from fakes import FakeBackbone  # noqa: E402

_real_load = backbones.load_backbone


def _load(name="litemedsam", checkpoint=None, device=None, **kwargs):
    if os.environ.get("MIAS_TEST_SLEEP"):
        time.sleep(float(os.environ["MIAS_TEST_SLEEP"]))
    if name.startswith("sam-") or checkpoint is not None:
        return _real_load(name, checkpoint, device, **kwargs)
    return FakeBackbone()


def _arm(where: str, nth: int, signame: str) -> None:
    sig = getattr(signal, f"SIG{signame}")
    calls = {"n": 0}

    def hit():
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # let a Python handler run here, inside the call

    def wrap(owner, attr):
        real = getattr(owner, attr)

        def wrapper(*a, **k):
            hit()
            return real(*a, **k)

        setattr(owner, attr, wrapper)

    import faiss

    import napari_mias_sam.core.atomic_outputs as oc
    import napari_mias_sam.jobs.outputs as wf

    if where == "save_nifti":
        wrap(wf, "save_nifti")
    elif where == "write_index":
        wrap(faiss, "write_index")
    elif where == "commit":
        wrap(oc.OutputSet, "commit")
    elif where in ("link", "replace"):
        wrap(os, where)
    else:
        raise SystemExit(f"unknown kill point {where}")


if __name__ == "__main__":
    backbones.load_backbone = _load
    if os.environ.get("MIAS_TEST_KILL"):
        w, n, s = os.environ["MIAS_TEST_KILL"].split(":")
        _arm(w, int(n), s)
    from napari_mias_sam.cli.commands import main

    sys.exit(main(sys.argv[1:]))
