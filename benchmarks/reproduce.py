"""Reproduce the benchmark tables of ``docs/results.md`` from scratch, in one command.

Run from the repository root, with the package installed (``pip install -e ".[eval]"``) and the
benchmark's data sources present (``nilearn``, Debian ``mricron-data``)::

    python benchmarks/reproduce.py --out bench

Steps (each printed as the equivalent shell command, then run; nothing outside ``--out`` is
written, the embedding cache included):

1. ``benchmarks/make_benchmark_data.py``: the cross-subject data (train MNI152-based, test
   Colin27-based with synthetic lesions), fixed seed;
2. ``mias-sam build-bank`` twice: the paper's 1,024-d patch layout and the 256-d mean layout
   (the second build reads the embeddings the first one cached);
3. ``mias-sam evaluate`` with both banks: the paper's metrics, 3D metrics, the slice decision,
   the 0.5-threshold baseline and every ablation (test slices encoded once);
4. ``mias-sam benchmark --accuracy``: the Dice cost of each bank index type and coreset ratio
   against the exact bank, on the same data (256-d layout by default: on a CPU every option's
   search of the 1,024-d layout would take minutes);
5. ``results.md``: the tables, with the machine, the date, the commands and each step's time.

Took 38 minutes on a 2-core CPU (``docs/results.md`` lists each step's measured time).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict, log: list[dict], *, stdout: Path | None = None) -> float:
    """Run ``cmd`` (``mias-sam`` is this Python's module), print it, record its wall time."""
    shown = " ".join(shlex.quote(c) for c in cmd) + (f" > {shlex.quote(str(stdout))}" if stdout else "")
    print(f"\n$ {shown}", flush=True)
    real = [sys.executable, "-m", "napari_mias_sam.cli.commands", *cmd[1:]] if cmd[0] == "mias-sam" else cmd
    t0 = time.perf_counter()
    if stdout:
        with open(stdout, "w") as fh:
            subprocess.run(real, env=env, check=True, stdout=fh)
    else:
        subprocess.run(real, env=env, check=True)
    dt = time.perf_counter() - t0
    log.append({"command": shown, "seconds": round(dt, 1)})
    return dt


def bank_options_table(rep: dict) -> str:
    """Markdown table of ``mias-sam benchmark --accuracy --json``."""
    lines = ["| bank option | patches | nprobe | mean slice Dice | Dice points vs exact | mask Dice vs exact (min over cases) | build s |",
             "|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        opt = ", ".join(f"{k}={v}" for k, v in r["option"].items())
        md = [c.get("mask_dice_vs_exact", 1.0) for c in r["cases"].values()]
        md = [m for m in md if m == m]  # NaN: both masks empty
        lines.append(f"| {opt} | {r['patches']:,} | {r['nprobe'] or ''} | {r['mean_slice_dice']:.4f} | "
                     f"{r['dice_points_vs_exact']:+.2f} | {min(md) if md else float('nan'):.3f} | {r['build_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (data/, banks/, eval/, cache/, results.md)")
    parser.add_argument("--device", default="cpu", help="cpu (default, as in docs/results.md), auto or cuda")
    parser.add_argument("--skip-bank-options", action="store_true", help="skip step 4 (index types and coresets)")
    parser.add_argument("--options-layout", default="mean256", choices=("mean256", "paper1024"),
                        help="patch layout of step 4 (default mean256: 4x cheaper on a CPU; paper1024 on a GPU)")
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not (out / ".mias-sam-benchmark").exists():
        parser.error(f"{out}: not empty and not a benchmark folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / ".mias-sam-benchmark").write_text("made by benchmarks/reproduce.py; safe to delete\n")
    env = dict(os.environ, MIAS_SAM_CACHE=str(out / "cache"))  # from scratch: a cache of its own
    log: list[dict] = []
    t0 = time.perf_counter()

    data = out / "data"
    if not (data / "benchmark.json").is_file():
        run([sys.executable, str(ROOT / "benchmarks" / "make_benchmark_data.py"), "--out", str(data)], env, log)
    else:
        print(f"using the existing data in {data} (delete it to regenerate)")
    banks = {"paper1024": out / "banks" / "paper1024", "mean256": out / "banks" / "mean256"}
    for layout, path in banks.items():
        run(["mias-sam", "build-bank", str(data / "train"), "--out", str(path), "--layout", layout, "--cache",
             "--device", args.device, "--overwrite"], env, log)
    images = sorted((data / "test" / "images").glob("*.nii.gz"))
    gts = [data / "test" / "labels" / i.name for i in images]
    eval_dir = out / "eval"
    run(["mias-sam", "evaluate", "--bank", str(banks["paper1024"]), "--bank", str(banks["mean256"]),
         "--images", *map(str, images), "--gts", *map(str, gts), "--out", str(eval_dir), "--device", args.device],
        env, log, stdout=out / "evaluate.txt")
    options = None
    if not args.skip_bank_options:
        opt_json = out / "bank_options.json"
        run(["mias-sam", "benchmark", "--accuracy", "--sample-dir", str(data), "--layout", args.options_layout,
             "--device", args.device, "--json"],
            env, log, stdout=opt_json)
        options = json.loads(opt_json.read_text())

    from napari_mias_sam.core.machine import machine_info

    total = time.perf_counter() - t0
    machine = machine_info()
    parts = [
        "# Benchmark results (synthetic lesions in real healthy anatomy)\n",
        f"Made by `python benchmarks/reproduce.py --out {out}` on {machine.get('date_utc')}; "
        f"total {total / 60:.1f} min.\n",
        "Machine: " + json.dumps({k: machine.get(k) for k in ("cpu", "cpu_count", "ram_gib", "torch", "faiss", "onnxruntime", "cuda", "load_average") if k in machine}) + "\n",
        "## Commands and times\n",
        "| command | s |\n|---|---|",
        *[f"| `{e['command']}` | {e['seconds']} |" for e in log],
        "\n## Evaluation (`mias-sam evaluate`)\n",
        (eval_dir / "results.md").read_text(),
    ]
    if options:
        parts += [f"\n## Bank index types and coresets (`mias-sam benchmark --accuracy`, layout {options['layout']})\n",
                  bank_options_table(options)]
    tmp = out / ".results.md.part"
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(out / "results.md")
    print(f"\nwrote {out / 'results.md'} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
