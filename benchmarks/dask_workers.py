"""One command for docs/distributed.md's table: ``build-bank`` and ``evaluate`` in one process and
on Dask LocalClusters of 1 and 2 worker processes (the real LiteMedSAM encoder on the CPU), each
result checked identical to the one-process run, with the load average before and after.

Run from the repository root (it writes only under --work)::

    nice -n 5 python benchmarks/dask_workers.py --work /tmp/dask-bench
    python benchmarks/dask_workers.py --work /tmp/dask-bench --bank-slices 42 --test-slices 20   # whole sample volumes

The bundled sample's three normal volumes (cut to --bank-slices axial slices each, around their
middle) make the bank; its two cases with ground truth (cut to --test-slices slices around their
lesion) are evaluated. Every run is a separate ``python -m napari_mias_sam.cli.commands``
process (so each pays its own start, model load and, with --dask, cluster start: what a user
pays); the wall time of each is printed, with the CLI's own ``seconds`` for the build. The
embedding cache is off (a private empty cache folder per run), so every run encodes.

On a machine with fewer cores than workers x threads the workers compete for the same cores: the
figures then show the overhead, not a speed-up (docs/distributed.md says which was measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from nifti_crops import crop_slices  # noqa: E402

SAMPLE = ROOT / "sample_data"
CONFIGS = {"one process": [], "local:1": ["--dask", "local:1"], "local:2": ["--dask", "local:2"]}


def uptime() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def inputs(work: Path, bank_slices: int, test_slices: int) -> tuple[list[Path], list[Path], list[Path]]:
    d = work / "data"
    d.mkdir(parents=True, exist_ok=True)
    normals = []
    for i in (1, 2, 3):
        n = nib.load(str(SAMPLE / f"normal_0{i}.nii.gz")).shape[2]
        k0 = max(0, (n - bank_slices) // 2)
        normals.append(crop_slices(SAMPLE / f"normal_0{i}.nii.gz", d / f"normal_0{i}.nii.gz", k0, min(n, k0 + bank_slices)))
    cases, gts = [], []
    for c in ("case_01", "case_02"):
        seg = np.asarray(nib.load(str(SAMPLE / f"{c}_seg.nii.gz")).dataobj) > 0
        n = seg.shape[2]
        centre = int(np.argmax(seg.reshape(-1, n).sum(0)))
        k0 = int(np.clip(centre - test_slices // 2, 0, max(0, n - test_slices)))
        cases.append(crop_slices(SAMPLE / f"{c}.nii.gz", d / f"{c}.nii.gz", k0, min(n, k0 + test_slices)))
        gts.append(crop_slices(SAMPLE / f"{c}_seg.nii.gz", d / f"{c}_seg.nii.gz", k0, min(n, k0 + test_slices)))
    return normals, cases, gts


def cli(args: list[str], cache: Path) -> tuple[float, str]:
    env = {**os.environ, "MIAS_SAM_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "napari_mias_sam.cli.commands", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): mias-sam {' '.join(args)}\n{r.stderr[-3000:]}")
    return wall, r.stdout


def bank_vectors(path: Path) -> tuple[np.ndarray, dict]:
    sys.path.insert(0, str(ROOT / "src"))
    from napari_mias_sam.bank import load_bank
    from napari_mias_sam.bank.knn import index_vectors

    bank = load_bank(path)
    return index_vectors(bank.index, 0, bank.ntotal), bank.manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="scratch folder (replaced)")
    p.add_argument("--bank-slices", type=int, default=8, help="axial slices per normal volume (default 8)")
    p.add_argument("--test-slices", type=int, default=6, help="axial slices per test case (default 6)")
    p.add_argument("--layout", default="paper1024")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    a = p.parse_args(argv)
    shutil.rmtree(a.work, ignore_errors=True)
    normals, cases, gts = inputs(a.work, a.bank_slices, a.test_slices)
    configs = [c.strip() for c in a.configs.split(",")]
    head = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_before": uptime(), "bank_slices": 3 * a.bank_slices, "test_slices": 2 * a.test_slices,
            "layout": a.layout}
    print(json.dumps(head), flush=True)
    rows, ref_bank, ref_eval = [], None, None
    for name in configs:
        out = a.work / name.replace(" ", "-").replace(":", "-")
        load0 = uptime()
        wall_b, stdout = cli(["build-bank", *map(str, normals), "--layout", a.layout, "--out", str(out / "bank"), "--json",
                              *CONFIGS[name]], out / "cache")
        secs = json.loads(stdout)["seconds"]
        vec, man = bank_vectors(out / "bank")
        if ref_bank is None:
            ref_bank = (vec, man)
        same_bank = bool(np.array_equal(vec, ref_bank[0]) and man["calibration"] == ref_bank[1]["calibration"])
        wall_e, _ = cli(["evaluate", "--bank", str(out / "bank"), "--images", *map(str, cases), "--gts", *map(str, gts),
                         "--gammas", "5", "--ks", "1", "--out", str(out / "eval"), *CONFIGS[name]], out / "cache")
        text = (out / "eval" / "results.json").read_text().replace(str(out), "RUN")  # the run's own folders
        res = json.loads(text)
        for k in ("timings_s", "outputs", "dask"):
            res.pop(k, None)
        if ref_eval is None:
            ref_eval = res
        row = {"config": name, "build_wall_s": round(wall_b, 1), "build_cli_s": secs, "bank_identical": same_bank,
               "evaluate_wall_s": round(wall_e, 1), "evaluate_identical": res == ref_eval, "load": f"{load0} -> {uptime()}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nload average before {head['load_before']}, after {uptime()}; {head['cpus']} CPUs; {head['date']}")
    print(f"bank: {head['bank_slices']} normal slices ({a.layout}); evaluate: {head['test_slices']} test slices, gamma 5, k 1\n")
    print("| run | build-bank wall (s) | (CLI's own s) | bank = one process's | evaluate wall (s) | results = one process's | load average |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['build_wall_s']} | {r['build_cli_s']} | {'yes' if r['bank_identical'] else 'NO'} | "
              f"{r['evaluate_wall_s']} | {'yes' if r['evaluate_identical'] else 'NO'} | {r['load']} |")
    return 0 if all(r["bank_identical"] and r["evaluate_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
