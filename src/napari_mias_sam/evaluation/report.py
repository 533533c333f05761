"""Write an evaluation's results: CSV, a Markdown table, PNG plots and JSON (all atomic)."""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
from pathlib import Path

from ..core.atomic_outputs import OutputSet
from ..method.regions import EXTENT_QUANTILE, SEED_QUANTILE

__all__ = ["write_report", "markdown_tables", "report_outputs", "REPORT_NAMES"]

_COLS = ["ablation", "value", "bank", "layout", "k", "normalisation", "prompt", "gamma", "mask",
         "slice_dice", "slice_dice_with_decision", "volume_dice", "volume_dice_with_decision",
         "lesionwise_dice", "lesionwise_hd95", "lesions_detected", "lesions_missed", "lesions_false_positive"]


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def _lesion_columns(row: dict) -> dict:
    t = row.get("lesionwise") or {}
    return {"lesionwise_dice": t.get("lesionwise_dice"), "lesionwise_hd95": t.get("lesionwise_hd95"),
            "lesions_detected": t.get("detected"), "lesions_missed": t.get("missed"),
            "lesions_false_positive": t.get("false_positives")}


def _lesionwise_table(res: dict) -> list[str]:
    """Lesion-wise Dice, HD95 and lesion counts of the default (and each bank), per subject."""
    rows = [r for r in res["rows"] if r.get("lesionwise") and (r["ablation"] == "default" or
                                                                (r["ablation"] == "bank" and len(res.get("banks", [])) > 1))]
    if not rows:
        return []
    out = ["\n### Lesion-wise (BraTS 2023 rule: true lesions dilated 3 voxels, overlap matches, false positives "
           "score Dice 0 and HD95 374 mm; true lesions of at most 50 mm^3 not counted)\n",
           "| run | subject | lesion-wise Dice | lesion-wise HD95 (mm) | true lesions | detected | missed | false positives | predicted lesions |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "default" if r["ablation"] == "default" else r["value"]
        for c in r["lesionwise_per_subject"]:
            out.append(f"| {name} | {c['subject']} | {_pct(c['lesionwise_dice'])} | {c['lesionwise_hd95']:.1f} | {c['gt_lesions']} | "
                       f"{c['detected']} | {c['missed']} | {c['false_positives']} | {c['pred_lesions']} |")
        t = r["lesionwise"]
        out.append(f"| {name} | **mean of {t['cases']}** | **{_pct(t['lesionwise_dice'])}** | **{t['lesionwise_hd95']:.1f}** | "
                   f"{t['gt_lesions']} | {t['detected']} | {t['missed']} | {t['false_positives']} | {t['pred_lesions']} |")
    return out


def markdown_tables(res: dict) -> str:
    """The paper-style tables (Dice and AUROC in %) as Markdown."""
    out = []
    data = res["data"]
    out.append(f"Test data: {data['slices']} slices ({data['anomalous_slices']} anomalous) in {len(data['units'])} "
               f"units ({data['volumes']} volumes). Backbone: {res['backbone']['name']}.\n")
    if data.get("dataset"):
        d = data["dataset"]
        out.append(f"Dataset {d['root']} ({d['layout']}, modality {d['modality']}"
                   + (f", masked to the {d['roi']} with each subject's labels" if d.get("roi") else "")
                   + f"): {len(d['subjects'])} test subjects; lesion = {d['lesion_labels']['rule']} "
                   f"({d['lesion_labels'].get('source', '')}; counted: {d['lesion_labels'].get('counted')}).\n")
    elif data.get("lesion_labels"):
        out.append(f"Lesion = {data['lesion_labels']['rule']} ({data['lesion_labels'].get('source', '')}).\n")
    out.append("### Detection (reference-normalised maps)\n")
    out.append("| bank | layout | k | P-AUROC | AUPRO@0.3 | image AUROC | 0.5-threshold slice Dice | 0.5-threshold volume Dice |")
    out.append("|---|---|---|---|---|---|---|---|")
    for d in res["detection"]:
        b = d["baseline_threshold_0.5"]
        out.append(f"| {d['bank']} | {d['layout']} | {d['k']} | {_pct(d['p_auroc'])} | {_pct(d['aupro_0.3'])} | "
                   f"{_pct(d['image_auroc'])} | {_pct(b['slice_dice'])} | {_pct(b['volume_dice'])} |")
    out.append("\n### Segmentation (Dice %, one factor varied at a time around the default)\n")
    out.append("| ablation | value | slice Dice | slice Dice, slice decision | volume Dice | volume Dice, slice decision | lesion-wise Dice |")
    out.append("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        lw = (r.get("lesionwise") or {}).get("lesionwise_dice")
        out.append(f"| {r['ablation']} | {r['value']} | {_pct(r['slice_dice'])} | {_pct(r['slice_dice_with_decision'])} | "
                   f"{_pct(r['volume_dice'])} | {_pct(r['volume_dice_with_decision'])} | {_pct(lw) if lw is not None else ''} |")
    out.extend(_lesionwise_table(res))
    cmp = res.get("default_vs_baseline")
    if cmp:
        line = (f"\n**Default vs the 0.5-threshold baseline** ({cmp['bank']}, {cmp['n']} anomalous slices): slice Dice "
                f"{_pct(cmp['mean_a'])} vs {_pct(cmp['mean_b'])}, difference {100 * cmp['difference']:+.2f} points, "
                f"95 % bootstrap interval [{100 * cmp['ci95'][0]:+.2f}, {100 * cmp['ci95'][1]:+.2f}] over slices")
        if "ci95_groups" in cmp:
            line += f", [{100 * cmp['ci95_groups'][0]:+.2f}, {100 * cmp['ci95_groups'][1]:+.2f}] over {cmp['groups']} subjects"
        line += f"; the default is better on {cmp['a_wins']} slices and worse on {cmp['a_loses']} (by more than 0.01)."
        out.append(line)
        v = cmp.get("volume")
        if v:
            out.append(f"\nVolume Dice, subject by subject ({v['n']} volumes, lesion-free ones included): "
                       f"{_pct(v['mean_a'])} vs {_pct(v['mean_b'])}, difference {100 * v['difference']:+.2f} points, "
                       f"95 % bootstrap interval [{100 * v['ci95_groups'][0]:+.2f}, {100 * v['ci95_groups'][1]:+.2f}] over subjects; "
                       f"the default is better on {v['a_wins']} volumes and worse on {v['a_loses']}.")
        if cmp.get("per_subject"):
            out.append("\n| subject | anomalous slices | slice Dice, default | slice Dice, 0.5-threshold baseline | volume Dice, default | volume Dice, baseline |")
            out.append("|---|---|---|---|---|---|")
            for s in cmp["per_subject"]:
                out.append(f"| {s['subject']} | {s['anomalous_slices']} | {_pct(s['slice_dice'])} | {_pct(s['baseline_slice_dice'])} | "
                           f"{_pct(s.get('volume_dice'))} | {_pct(s.get('baseline_volume_dice'))} |")
    ds = res["default_settings"]
    out.append(f"\nDefault: prompt {ds['prompt']}, gamma {ds['gamma']:g}, mask {ds['mask']}, k {ds['k']}, "
               f"normalisation {ds['normalisation']}. "
               + ("The regions prompt gives one box per anomalous region: where the calibrated map exceeds the "
                  f"{SEED_QUANTILE:g}th percentile of held-out normal slices' peaks, extended in 3D while it stays above their "
                  f"{EXTENT_QUANTILE:g}th (levels from the bank's calibration only); each box surrounds the region's core, "
                  "and its mask is clipped to the region. "
                  if ds["prompt"] == "regions" else "")
               + "Slice Dice follows the paper (mean over anomalous slices). "
               "The slice decision keeps a slice's mask only if its image score exceeds every held-out normal "
               "slice's score in the bank's calibration (no test labels are read).")
    return "\n".join(out) + "\n"


def _plots(res: dict, out: Path, outs: OutputSet) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    rows = res["rows"]
    gam = [r for r in rows if r["ablation"] == "gamma"]
    if gam:
        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
        ax.plot([r["gamma"] for r in gam], [100 * (r["slice_dice"] or 0) for r in gam], "o-", label="slice Dice")
        if gam[0]["volume_dice"] is not None:
            ax.plot([r["gamma"] for r in gam], [100 * (r["volume_dice"] or 0) for r in gam], "s--", label="volume Dice")
        ax.set_xlabel("gamma")
        ax.set_ylabel("Dice (%)")
        ax.set_title("Gamma sweep")
        ax.legend()
        fig.tight_layout()
        written.append(_save_fig(fig, out / "gamma_sweep.png", outs))
        plt.close(fig)
    groups = [g for g in ("mask", "prompt", "normalisation", "k", "bank") if any(r["ablation"] == g for r in rows)]
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(3.0 * len(groups), 3.2), dpi=120, squeeze=False)
        for ax, g in zip(axes[0], groups):
            sel = [r for r in rows if r["ablation"] == g]
            ax.bar(range(len(sel)), [100 * (r["slice_dice"] or 0) for r in sel])
            names = [r["bank"] if g == "bank" else r["value"] for r in sel]  # a bank's value repeats its layout
            ax.set_xticks(range(len(sel)), [n[:14] for n in names], rotation=30, ha="right", fontsize=7)
            ax.set_title(g)
            ax.set_ylabel("slice Dice (%)")
        fig.tight_layout()
        written.append(_save_fig(fig, out / "ablations.png", outs))
        plt.close(fig)
    return written


REPORT_NAMES = ("results.csv", "results.md", "results.json", "gamma_sweep.png", "ablations.png")


def report_outputs(out: str | Path, *, overwrite: bool = False, inputs=()) -> OutputSet:
    """The (unclaimed) output set of an evaluation: :data:`REPORT_NAMES` in ``out``, under one lock."""
    return OutputSet(out, REPORT_NAMES, overwrite=overwrite, inputs=inputs, lock_name="results")


def _save_fig(fig, path: Path, outs: OutputSet) -> Path:
    fig.savefig(outs.temp(path.name), format="png")
    return path


def write_report(res: dict, out: str | Path, *, overwrite: bool = False, claim: OutputSet | None = None) -> dict[str, str]:
    """Write results.csv, results.md, results.json and plots into ``out``; return the paths. The
    files are claimed as a set (``claim``, or claimed here: existing results are kept unless
    ``overwrite``) and moved into place together."""
    out = Path(out)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_COLS, extrasaction="ignore")
    w.writeheader()
    w.writerows([{**r, **_lesion_columns(r)} for r in res["rows"]])
    with contextlib.ExitStack() as stack:
        outs = claim if claim is not None else stack.enter_context(report_outputs(out, overwrite=overwrite))
        outs.temp("results.csv").write_text(buf.getvalue(), encoding="utf-8")
        outs.temp("results.md").write_text(markdown_tables(res), encoding="utf-8")
        outs.temp("results.json").write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
        paths = {"csv": out / "results.csv", "markdown": out / "results.md", "json": out / "results.json"}
        for p in _plots(res, out, outs):
            paths[p.stem] = p
        outs.commit()
    return {k: str(v) for k, v in paths.items()}
