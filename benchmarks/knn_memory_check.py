"""Checks the memory estimate behind the ``--k`` guard (napari_mias_sam.jobs.preflight.knn_search_bytes)
against the measured peak of real ``mias-sam segment`` runs.

A bank of 6 normal slices (6,144 patches, mean256 layout) and a 6-slice test volume, made here;
the encoder is the tests' fake backbone (the kNN step does not depend on the encoder). Each run
is a fresh process; its peak resident memory comes from the kernel (wait4). Printed per k: the
peak, the increase over k = 1, and the estimate of the kNN step::

    python benchmarks/knn_memory_check.py [--ks 1,1024,6144]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from core_fixtures import anatomy_volume, write_nifti  # noqa: E402
from napari_mias_sam.jobs.preflight import knn_search_bytes  # noqa: E402

RUNNER = ROOT / "tests" / "reliability_runner.py"


def peak_rss_mb(args: list[str], env: dict) -> tuple[int, float]:
    p = subprocess.Popen([sys.executable, str(RUNNER), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024.0  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,1024,6144")
    ks = [int(k) for k in ap.parse_args().ks.split(",")]
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    with tempfile.TemporaryDirectory(prefix="knn-memory-") as tmp:
        t = Path(tmp)
        for i in (1, 2):
            write_nifti(t / "normals" / f"n{i}.nii.gz", anatomy_volume((48, 48, 3), seed=i) * 200, aff)
        write_nifti(t / "case.nii.gz", anatomy_volume((48, 48, 6), seed=5) * 200, aff)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), MIAS_SAM_CACHE=str(t / "cache"))
        rc, _ = peak_rss_mb(["build-bank", str(t / "normals"), "--out", str(t / "bank"), "--layout", "mean256"], env)
        assert rc == 0
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; bank 6,144 patches, volume of 6 slices")
        base = None
        for k in ks:
            rc, peak = peak_rss_mb(["segment", str(t / "case.nii.gz"), "--bank", str(t / "bank"), "--out", str(t / f"out{k}"),
                                    "--k", str(k), "--no-cache"], env)
            base = peak if base is None else base
            est = knn_search_bytes(6, k, 6144) / 1e6
            print(f"  k={k:>6}: exit {rc}, peak {peak:7.0f} MB, over k={ks[0]}: {peak - base:6.0f} MB, estimate {est:6.0f} MB")


if __name__ == "__main__":
    main()
