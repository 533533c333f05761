"""``mias-sam qa-report --out DIR``: the review summary written as JSON and Markdown, and a plot
of each correction's displacement against its slice's anomaly score, as one atomic set.

The plot is drawn with Pillow (a core dependency) rather than matplotlib (only in the ``eval``
extra), so that a plain install from the napari hub writes it too.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.atomic_outputs import OutputSet
from ..data.qa_table import REPORT_NAMES, report_text

__all__ = ["displacement_plot", "write_qa_report"]

_W, _H, _L, _R, _T, _B = 720, 480, 80, 20, 60, 60  # size and margins (pixels)
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font (the bitmap one takes no anchors)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / n if hi > lo else 1.0
    mag = 10 ** np.floor(np.log10(step))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step), default=step)
    start = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(start, hi + step * 1e-6, step)]


def displacement_plot(summary: dict) -> Image.Image:
    """Scatter of corrections: the slice's anomaly (image) score on x, the displacement (mm) on
    y, one colour per volume (legend at the top right)."""
    pts = [c for c in summary["overall"]["corrections"] if c["image_score"] is not None and c["displacement_mm"] is not None]
    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    small, big = _font(13), _font(16)
    d.text((_L, 10), f"Prompt corrections: displacement against the slice's anomaly score ({len(pts)})", fill="black", font=big)
    x0, x1, y0, y1 = _L, _W - _R, _H - _B, _T
    d.rectangle((x0, y1, x1, y0), outline="black")
    xs = [c["image_score"] for c in pts] or [0.0, 1.0]
    ys = [c["displacement_mm"] for c in pts] or [0.0, 1.0]
    xlo, xhi = min(xs), max(xs)
    pad = (xhi - xlo) * 0.08 or 0.5
    xlo, xhi = xlo - pad, xhi + pad
    ylo, yhi = 0.0, max(ys) * 1.3 or 1.0  # headroom for the legend

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y0 - (y - ylo) / (yhi - ylo) * (y0 - y1)

    for t in _ticks(xlo, xhi):
        u, _ = px(t, ylo)
        d.line((u, y0, u, y0 + 5), fill="black")
        d.text((u, y0 + 8), f"{t:g}", fill="black", font=small, anchor="mt")
    for t in _ticks(ylo, yhi):
        _, v = px(xlo, t)
        d.line((x0 - 5, v, x0, v), fill="black")
        d.text((x0 - 8, v), f"{t:g}", fill="black", font=small, anchor="rm")
    d.text(((x0 + x1) / 2, _H - 18), "slice anomaly score (image score)", fill="black", font=small, anchor="mm")
    d.text((8, y1 - 24), "displacement (mm)", fill="black", font=small)
    volumes = sorted({c["volume"] for c in pts})
    for c in pts:
        u, v = px(c["image_score"], c["displacement_mm"])
        col = _COLOURS[volumes.index(c["volume"]) % len(_COLOURS)]
        d.ellipse((u - 4, v - 4, u + 4, v + 4), fill=col, outline="black")
    for n, name in enumerate(volumes[:12]):
        col = _COLOURS[n % len(_COLOURS)]
        d.ellipse((x1 - 150, y1 + 10 + 18 * n, x1 - 142, y1 + 18 + 18 * n), fill=col, outline="black")
        d.text((x1 - 136, y1 + 14 + 18 * n), name[:18], fill="black", font=small, anchor="lm")
    if not pts:
        d.text(((x0 + x1) / 2, (y0 + y1) / 2), "no corrected prompts", fill="gray", font=big, anchor="mm")
    return img


def write_qa_report(summary: dict, out: str | Path, *, overwrite: bool = False, inputs=()) -> dict[str, str]:
    """Write ``qa_report.json``, ``qa_report.md`` and ``qa_displacement.png`` into ``out`` together
    (existing ones are kept unless ``overwrite``; an input is never overwritten)."""
    out = Path(out)
    with contextlib.ExitStack() as stack:
        outs = stack.enter_context(OutputSet(out, REPORT_NAMES, overwrite=overwrite, inputs=inputs, lock_name="qa_report"))
        outs.temp("qa_report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        outs.temp("qa_report.md").write_text(report_text(summary), encoding="utf-8")
        displacement_plot(summary).save(outs.temp("qa_displacement.png"), format="PNG")
        outs.commit()
    return {kind: str(out / n) for kind, n in zip(("json", "markdown", "plot"), REPORT_NAMES)}
