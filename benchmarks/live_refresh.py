"""Whole-volume live update cost without a viewer: a gamma change, then every slice re-prompted and
re-decoded through the viewer's Qt-free ``LiveSession`` (``change_settings`` + ``refresh_iter``),
for the ``regions`` and ``cog-box`` prompts, on the device given (docs/performance.md, section 5)::

    mias-sam demo --device cuda --out /tmp/demo      # a bank from the bundled normal volumes
    python benchmarks/live_refresh.py /tmp/demo/bank sample_data/case_01.nii.gz live.json --device cuda
    python benchmarks/live_refresh.py /tmp/demo/bank - live155.json --device cuda --synthetic   # 240x240x155

Each backbone decode is timed with a CUDA synchronise around it (the ``decode_s`` column).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_mias_sam import load_backbone, load_bank, load_volume, segment_volume
from napari_mias_sam.pipeline.settings import SegmentSettings
from napari_mias_sam.viewer.models.live import LiveSession


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> int:
    bank_dir, case, out_json = sys.argv[1:4]
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    synthetic = "--synthetic" in sys.argv
    bb = load_backbone("litemedsam", device=device)
    dev = torch.device(bb.device)
    bank = load_bank(bank_dir)
    tmp = tempfile.mkdtemp(prefix="live-")
    if synthetic:
        import nibabel as nib

        from napari_mias_sam.evaluation.benchmark import BENCH_SHAPE, synthetic_volume
        case = str(Path(tmp) / "synthetic.nii.gz")
        nib.save(nib.Nifti1Image(synthetic_volume(BENCH_SHAPE), np.diag([1.0, 1.0, 1.0, 1.0])), case)
    vol = load_volume(case)
    report: dict = {"device": str(dev), "case": "synthetic 240x240x155" if synthetic else case,
                    "torch": torch.__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    calls = {"n": 0, "t": 0.0}
    real_decode = bb.decode

    def counting_decode(*a, **kw):
        sync(dev)
        t0 = time.perf_counter()
        out = real_decode(*a, **kw)
        sync(dev)
        calls["n"] += 1
        calls["t"] += time.perf_counter() - t0
        return out

    for prompt in ("regions", "cog-box"):
        settings = SegmentSettings(prompt=prompt)
        sync(dev)
        t0 = time.perf_counter()
        res = segment_volume(vol, bank, bb, settings)
        sync(dev)
        seg_s = time.perf_counter() - t0
        bb.decode = counting_decode
        ses = LiveSession(res, bb, (0, 1, 2))
        n = ses.n_slices
        fg = int(res.encoded.foreground.sum())
        mid = int(np.flatnonzero(res.encoded.foreground)[fg // 2]) if fg else n // 2
        rows = []
        # the first gamma change also hashes every embedding once (the session's digests)
        for i, gamma in enumerate((4.0, 3.0, 2.0, 8.0, 1.0)):
            calls.update(n=0, t=0.0)
            ses.change_settings(ses.settings.replace(gamma=gamma))
            order = ses.order_from(mid)
            t0 = time.perf_counter()
            first = None
            for j, _u in enumerate(ses.refresh_iter(order, ses.generation)):
                if j == 0:
                    sync(dev)
                    first = time.perf_counter() - t0
            sync(dev)
            total = time.perf_counter() - t0
            rows.append({"gamma": gamma, "first_slice_s": round(first or 0.0, 4), "all_slices_s": round(total, 4),
                         "decodes": calls["n"], "decode_s": round(calls["t"], 4),
                         "ms_per_decode": round(1000 * calls["t"] / max(calls["n"], 1), 2), "note": "first: hashes embeddings" if i == 0 else ""})
        bb.decode = real_decode
        report[prompt] = {"slices": n, "with_anatomy": fg, "segment_s": round(seg_s, 3), "timings": {k: round(v, 3) for k, v in res.timings.items()},
                          "gamma_changes": rows}
        print(prompt, json.dumps(report[prompt]), flush=True)
    Path(out_json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
