"""Speculative decodes of the shown slice at the gamma values next to the current one (no Qt).

A user who moves the gamma slider by a step or two finds the shown slice's decodes already in the
session's :class:`~napari_mias_sam.pipeline.decode_cache.CachedDecoder`: the change then costs
what a mask change costs. The prompts are the ones a real gamma change sends
(:func:`~napari_mias_sam.pipeline.segment.decoder_prompts`, the same functions as
:func:`~napari_mias_sam.pipeline.segment.redecode_slice`: the region pieces' gamma-CoG boxes or
points, cog-box, cog-point; a user-moved point stays where it is), and the cache is keyed by the
exact prompt, so what a later change reads is bit for bit what it would have decoded.

:func:`prefetch_gammas` decodes one prompt at a time on one core
(:meth:`~napari_mias_sam.pipeline.decode_cache.CachedDecoder.prefetch`), checking the session's
generation before each; the session lock is held only while the prompts are computed (never
during a decode, so nothing on the GUI thread waits on it), and a
:class:`~napari_mias_sam.backbones.base.DecodeStop` ends the decode in flight (ONNX Runtime's
terminate flag: a few milliseconds). The viewer starts it only when no pass runs and stops it at
the start of every change (``viewer/widget_live.py``), so a change never waits on it nor shares
the cores with it. Point prompts (``cog-point`` with LiteMedSAM, every prompt of the SAM
backbones) have no single-thread ONNX path: the backbone's own ``decode`` runs them, and a stop
takes effect after the decode in flight. :func:`gamma_neighbours`: which gammas, nearest first.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from ...backbones.base import DecodeStop, DecodeStopped
from ...core import defaults
from ...pipeline.segment import decoder_prompts

__all__ = ["PREFETCH_ENV", "prefetch_enabled", "gamma_neighbours", "on_gamma_grid", "prefetch_gammas"]

#: Environment variable: ``0`` turns the prefetch off (the benchmark's cold figures, the tests).
PREFETCH_ENV = "MIAS_SAM_PREFETCH"


def prefetch_enabled() -> bool:
    """Whether the viewer prefetches (the default, unless ``MIAS_SAM_PREFETCH`` is 0/off/false/no)."""
    value = os.environ.get(PREFETCH_ENV, "").strip().lower()
    if not value:
        return bool(defaults.PREFETCH)
    return value not in ("0", "off", "false", "no")


def on_gamma_grid(gamma: float, keep: float | None = None, step: float = defaults.GAMMA_STEP) -> float:
    """``gamma`` as the dock's slider means it: the nearest value of the slider's grid (its step,
    0.5). magicgui's FloatSlider keeps 10^6 positions per unit, so a drag of its handle lands on
    values such as 4.500017 or 4.37, which the prefetch (made on the grid) would never match.
    ``keep``: a value that stays as it is (the shown result's own gamma, which a ``--gamma 3.3`` run
    reopened in the dock may have off the grid)."""
    g = float(gamma)
    if keep is not None and g == float(keep):
        return g
    return float(round(g / float(step)) * float(step))


def gamma_neighbours(gamma: float, steps: int = defaults.PREFETCH_STEPS, step: float = defaults.GAMMA_STEP,
                     bounds: tuple[float, float] = defaults.GAMMA_RANGE) -> list[float]:
    """The slider's values 1..``steps`` steps either side of ``gamma``, nearest first (up before
    down at equal distance), within ``bounds``; ``gamma`` itself is not among them."""
    lo, hi = float(bounds[0]), float(bounds[1])
    out: list[float] = []
    for k in range(1, int(steps) + 1):
        for sign in (1, -1):
            g = float(gamma) + sign * k * float(step)
            if lo <= g <= hi and g != float(gamma) and g not in out:
                out.append(g)
    return out


def prefetch_gammas(session, s: int, gammas: Iterable[float], generation: int,
                    cancelled: Callable[[], bool] | None = None, stop: DecodeStop | None = None) -> int:
    """Decode slice ``s`` of ``session`` (a :class:`~napari_mias_sam.viewer.models.live.LiveSession`)
    ahead at each of ``gammas`` (the other settings and the slice's moved point as in force), one
    prompt at a time, skipping prompts already remembered. Stops before the next decode once
    ``generation`` is no longer the session's, the settings changed, or ``cancelled()``; ``stop``
    (:meth:`~napari_mias_sam.backbones.base.DecodeStop.stop`, from any thread) also ends the decode
    in flight. The session lock is held while the prompts are computed, not during a decode.
    Returns how many prompts it decoded."""
    s = int(s)
    settings = session.settings
    done = 0

    def superseded() -> bool:
        return (generation != session.generation or session.settings is not settings
                or (cancelled is not None and bool(cancelled())) or (stop is not None and stop.stopped))

    emb = None
    for g in gammas:
        with session.lock:
            if superseded():
                return done
            prompts = decoder_prompts(session.result, session.backbone, s, settings=settings.replace(gamma=float(g)),
                                      point=session.overrides.get(s), piece=session.moved_piece.get(s))
            if prompts and emb is None:
                emb = session.result.encoded.embeddings[s].float()  # what redecode_slice hands the decoder
        for p in prompts:
            if superseded():
                return done
            try:
                with session.decoding(s):
                    done += bool(session.decoder.prefetch(emb, p, stop=stop))
            except DecodeStopped:
                return done
    return done
