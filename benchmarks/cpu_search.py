"""Exact nearest-neighbour search on the CPU, side by side: faiss-gpu's CPU kernels, faiss-cpu, and
the package's torch GEMM search (``napari_mias_sam.bank.knn.TorchSearcher`` in fp32).

faiss-gpu and faiss-cpu are both the ``faiss`` module, so each backend runs in its own process:
faiss-gpu and the torch search with this interpreter, faiss-cpu with the interpreter of a venv
that has faiss-cpu installed over the same packages (created on first use with
``python -m venv --system-site-packages`` and ``pip install faiss-cpu==<faiss-gpu's version>``,
or given with ``--faiss-cpu-python``). Every backend searches the same random bank (same seed)
with the same queries; the distances are compared and the table is printed.

    nice -n 5 python benchmarks/cpu_search.py          # 82k and 1M patches, 1,024-d and 256-d
    python benchmarks/cpu_search.py --cells 82000x256:4096 1000000x256:1024   # bank x dim : queries

Each cell runs every backend in its own process, one after the other, in an order that rotates from
cell to cell (so a change in the machine's load does not favour one backend); each backend keeps
the best of --repeats searches. Memory: the bank is held in fp32 once per process (1M x 1,024-d:
4 GiB), one process at a time.

The results and the machine they came from are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

BACKENDS = ("faiss-gpu", "faiss-cpu", "torch")
DEFAULT_VENV_DIR = Path("/tmp/mias-sam-cpu-search-venvs")
BLOCK = 65_536


def _blocks(n: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    for s in range(0, n, BLOCK):
        yield rng.standard_normal((min(BLOCK, n - s), d), dtype=np.float32)


def _faiss_dist() -> str:
    names = []
    for name in ("faiss-gpu", "faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11"):
        try:
            names.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(names) or "?"


def _cell(text: str) -> tuple[int, int, int]:
    """``NxD:Q`` -> (bank patches, dimension, queries)."""
    try:
        nd, q = text.split(":")
        n, d = nd.lower().split("x")
        return int(n), int(d), int(q)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BANKxDIM:QUERIES, e.g. 82000x1024:4096") from None


def worker(backend: str, cells: list[tuple[int, int, int]], repeats: int) -> dict:
    """Time one backend in this process; returns the timings and a checksum of the distances."""
    import faiss
    import torch

    rows = []
    for n, d, nq in cells:
        q = np.random.default_rng(1).standard_normal((nq, d), dtype=np.float32)
        if backend == "torch":
            from napari_mias_sam.bank.knn import TorchSearcher

            t0 = time.perf_counter()
            searcher = TorchSearcher((torch.from_numpy(b) for b in _blocks(n, d, seed=0)), device="cpu", dtype=torch.float32)
            build = time.perf_counter() - t0
            search = lambda x: searcher.search(x, 1)  # noqa: E731
        else:
            t0 = time.perf_counter()
            index = faiss.IndexFlatL2(d)
            for b in _blocks(n, d, seed=0):
                index.add(b)
            build = time.perf_counter() - t0
            search = lambda x: index.search(x, 1)[0]  # noqa: E731
        search(q[:64])  # warm-up
        times, dist = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            dist = search(q)
            times.append(time.perf_counter() - t0)
        rows.append({"n": n, "d": d, "queries": len(q), "build_s": build, "search_s": min(times),
                     "dist_mean": float(np.mean(dist)), "dist_head": [float(x) for x in np.ravel(dist)[:64]]})
        del search
        if backend == "torch":
            del searcher
        else:
            del index
    return {
        "backend": backend,
        "faiss_module": faiss.__file__,
        "faiss_dist": _faiss_dist(),
        "faiss_threads": int(faiss.omp_get_max_threads()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


def _faiss_cpu_python(venv_dir: Path) -> Path:
    """A venv seeing this interpreter's packages, with faiss-cpu (faiss-gpu's version) over them."""
    py = venv_dir / "faiss-cpu" / "bin" / "python"
    if not py.exists():
        version = metadata.version("faiss-gpu")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(py.parents[1])], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", f"faiss-cpu=={version}"], check=True)
    return py


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=_cell, nargs="+",
                   default=[_cell(c) for c in ("82000x1024:4096", "1000000x1024:1024", "82000x256:4096", "1000000x256:1024")],
                   help="BANKxDIM:QUERIES (dims: 1,024 = paper1024 layout, 256 = mean256; 4,096 queries = one 64 x 64 slice)")
    p.add_argument("--repeats", type=int, default=2, help="timed searches per cell (the best is kept)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--faiss-cpu-python", type=Path, help="python of a venv with faiss-cpu (default: made under --venv-dir)")
    p.add_argument("--venv-dir", type=Path, default=DEFAULT_VENV_DIR)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        print(json.dumps(worker(a.worker, a.cells, a.repeats)))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from napari_mias_sam.core.machine import cpu_model

    started = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    pythons = {b: Path(sys.executable) for b in a.backends}
    if "faiss-cpu" in pythons:
        pythons["faiss-cpu"] = a.faiss_cpu_python or _faiss_cpu_python(a.venv_dir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    results: dict[str, dict] = {}
    for i, (n, d, nq) in enumerate(a.cells):
        order = a.backends[i % len(a.backends):] + a.backends[: i % len(a.backends)]
        for backend in order:
            cmd = [str(pythons[backend]), __file__, "--worker", backend, "--cells", f"{n}x{d}:{nq}", "--repeats", str(a.repeats)]
            print(f"[{backend}] {' '.join(cmd)}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {backend}: {n:,} x {d}, {nq:,} queries: {r['rows'][0]['search_s']:.2f} s "
                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            results.setdefault(backend, {**r, "rows": []})["rows"] += r["rows"]
    load_after = os.getloadavg()

    first = next(iter(results.values()))
    print(f"# Exact CPU search (k = 1, squared L2), {dt.date.today().isoformat()} "
          f"{started:%H:%M} UTC, {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}")
    print(f"# torch {first['torch']} ({first['torch_threads']} threads); command: python benchmarks/cpu_search.py "
          + " ".join(sys.argv[1:]))
    print(f"# load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores")
    for backend, r in results.items():
        print(f"# {backend}: {r['faiss_dist']} (faiss module {Path(r['faiss_module']).parent}, {r['faiss_threads']} OpenMP threads)")
    print()
    print("| bank patches | dim | queries | backend | search (s) | ms per 1,000 queries | vs faiss-gpu | max dist diff |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    ref = results.get("faiss-gpu") or first
    for i, row in enumerate(ref["rows"]):
        for backend in a.backends:
            r = results[backend]
            rr = r["rows"][i]
            diff = float(np.max(np.abs(np.array(rr["dist_head"]) - np.array(row["dist_head"]))))
            rel = row["search_s"] / rr["search_s"]
            print(f"| {rr['n']:,} | {rr['d']} | {rr['queries']:,} | {backend} | {rr['search_s']:.2f} | "
                  f"{1000 * rr['search_s'] / rr['queries'] * 1000:.1f} | {rel:.2f}x | {diff:.2g} |")
    if a.json:
        a.json.write_text(json.dumps({"started": started.isoformat(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
