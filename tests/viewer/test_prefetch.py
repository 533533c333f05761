"""The viewer's prefetch without a viewer (viewer/models/prefetch.py), on the real LiteMedSAM: the
shown slice decoded ahead at the next gamma values makes a one-step gamma change decode nothing,
with results bit for bit those of a session that never prefetched; a new generation stops it."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest

from napari_mias_sam.backbones.base import DecodeStop, DecodeStopped
from napari_mias_sam.data.volumes import load_volume
from napari_mias_sam.method.prompts import Prompt
from napari_mias_sam.pipeline.embedding_cache import EmbeddingCache
from napari_mias_sam.pipeline.segment import segment_volume
from napari_mias_sam.pipeline.settings import SegmentSettings
from napari_mias_sam.viewer.models.live import LiveSession
from napari_mias_sam.viewer.models.prefetch import gamma_neighbours, on_gamma_grid, prefetch_enabled, prefetch_gammas

pytestmark = pytest.mark.usefixtures("mias_cache_dir")


@pytest.fixture(scope="module", params=["regions", "cog-box"])
def result(request, sample_subset, sample_bank, lite_backbone):
    return segment_volume(load_volume(sample_subset["case"]), sample_bank, lite_backbone,
                          SegmentSettings(prompt=request.param), cache=EmbeddingCache())


def _shown(res) -> int:
    """The slice with the most prompts (region pieces)."""
    return int(np.argmax([len(p.centres()) if p is not None else -1 for p in res.prompts]))


def _gamma_change(ses: LiveSession, s: int, gamma: float) -> None:
    ses.change_settings(ses.settings.replace(gamma=gamma))
    assert list(ses.refresh_iter([s], ses.generation))


def _same_slice(a, b, s: int) -> None:
    assert a.prompts[s] == b.prompts[s]
    np.testing.assert_array_equal(a.logits[s], b.logits[s])
    np.testing.assert_array_equal(a.ious[s], b.ious[s])
    for m in (1, 2, 3):
        np.testing.assert_array_equal(a.slice_mask(s, m), b.slice_mask(s, m))


def test_slider_values_next_to_the_grid_are_put_on_it():
    assert on_gamma_grid(4.500017) == 4.5 and on_gamma_grid(4.49991) == 4.5 and on_gamma_grid(5.0) == 5.0
    assert on_gamma_grid(4.37) == 4.5 and on_gamma_grid(4.2) == 4.0
    assert on_gamma_grid(3.3, keep=3.3) == 3.3  # the shown result's own gamma, off the grid, is kept
    assert on_gamma_grid(3.6, keep=3.3) == 3.5


def test_gamma_neighbours_nearest_first_within_the_slider(monkeypatch):
    assert gamma_neighbours(5.0, steps=2) == [5.5, 4.5, 6.0, 4.0]
    assert gamma_neighbours(0.5, steps=2) == [1.0, 1.5]
    assert gamma_neighbours(20.0, steps=2) == [19.5, 19.0]
    assert gamma_neighbours(5.0, steps=1) == [5.5, 4.5]
    # the viewer's default: six steps either side (+-3.0), nearest first, within the slider
    assert gamma_neighbours(5.0) == [5.5, 4.5, 6.0, 4.0, 6.5, 3.5, 7.0, 3.0, 7.5, 2.5, 8.0, 2.0]
    assert gamma_neighbours(1.0) == [1.5, 0.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    monkeypatch.setenv("MIAS_SAM_PREFETCH", "0")
    assert not prefetch_enabled()
    monkeypatch.setenv("MIAS_SAM_PREFETCH", "1")
    assert prefetch_enabled()
    monkeypatch.delenv("MIAS_SAM_PREFETCH")
    assert prefetch_enabled()  # on by default (core/defaults.py PREFETCH)


def test_a_prefetched_gamma_step_decodes_nothing_and_equals_a_direct_decode(result, lite_backbone):
    ses = LiveSession(copy.deepcopy(result), lite_backbone)
    s = _shown(result)
    g = ses.settings.gamma
    announced = []
    ses.decoder.before_decode = lambda: announced.append(1)  # what the live controller waits on
    n = prefetch_gammas(ses, s, gamma_neighbours(g, steps=2), ses.generation)
    assert n >= 1 and not announced  # prefetch decodes never announce a pass's decode
    assert prefetch_gammas(ses, s, gamma_neighbours(g, steps=2), ses.generation) == 0  # all remembered: nothing again
    for gamma in (g + 0.5, g - 1.0):  # one step up, two steps down
        misses = ses.decoder.misses
        _gamma_change(ses, s, gamma)
        assert ses.decoder.misses == misses, f"gamma {gamma}: decoded again"
        assert ses.result.prompts[s] != result.prompts[s]  # gamma moved the prompts
        ref = LiveSession(copy.deepcopy(result), lite_backbone)  # its own decoder: no prefetch, no cache
        _gamma_change(ref, s, gamma)
        assert ref.decoder.misses >= 1
        _same_slice(ses.result, ref.result, s)


def test_a_moved_point_is_prefetched_where_the_user_put_it(result, lite_backbone):
    ses = LiveSession(copy.deepcopy(result), lite_backbone)
    s = _shown(result)
    p = ses.slice_points(s)[0]
    ses.move_point(s, (p[0] + 5.0, p[1] + 3.0, p[2]), piece=0)
    assert list(ses.refresh_iter([s], ses.generation))
    g = ses.settings.gamma
    prefetch_gammas(ses, s, gamma_neighbours(g, steps=1), ses.generation)
    misses = ses.decoder.misses
    _gamma_change(ses, s, g + 0.5)
    assert ses.decoder.misses == misses
    ref = LiveSession(copy.deepcopy(result), lite_backbone, overrides=dict(ses.overrides))
    ref.moved_piece = dict(ses.moved_piece)
    _gamma_change(ref, s, g + 0.5)
    _same_slice(ses.result, ref.result, s)


def test_a_new_generation_stops_the_prefetch_at_the_next_decode(result, lite_backbone):
    ses = LiveSession(copy.deepcopy(result), lite_backbone)
    s = _shown(result)
    gen = ses.generation
    assert prefetch_gammas(ses, s, gamma_neighbours(ses.settings.gamma), gen - 1) == 0  # superseded already
    assert ses.decoder.misses == 0
    free = []
    real = ses.decoder.prefetch

    def free_elsewhere() -> bool:
        got = []

        def probe():
            got.append(ses.lock.acquire(blocking=False))
            if got[0]:
                ses.lock.release()

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        return got[0]

    def prefetch(emb, prompt, stop=None):
        free.append(free_elsewhere())  # the session lock is not held during a decode
        out = real(emb, prompt, stop=stop)
        ses.new_generation()  # a user's change arrives during this decode
        return out

    ses.decoder.prefetch = prefetch
    assert prefetch_gammas(ses, s, gamma_neighbours(ses.settings.gamma), gen) == 1
    assert free == [True] and ses.decoder.misses == 1
    ses.decoder.prefetch = real
    assert prefetch_gammas(ses, s, gamma_neighbours(ses.settings.gamma), ses.generation, cancelled=lambda: True) == 0


def test_a_stop_ends_the_decode_in_flight(result, lite_backbone):
    """What the viewer does at the start of every change: the speculative decode ends at once
    (ONNX Runtime's terminate flag) and nothing half-done is remembered."""
    ses = LiveSession(copy.deepcopy(result), lite_backbone)
    s = _shown(result)
    stop, started, out = DecodeStop(), threading.Event(), []
    real = ses.decoder.prefetch

    def prefetch(emb, prompt, stop=None):
        started.set()
        return real(emb, prompt, stop=stop)

    ses.decoder.prefetch = prefetch
    t = threading.Thread(target=lambda: out.append(prefetch_gammas(ses, s, gamma_neighbours(ses.settings.gamma),
                                                                   ses.generation, stop=stop)))
    t.start()
    assert started.wait(60)
    t0 = time.perf_counter()
    stop.stop()
    t.join(30)
    took = time.perf_counter() - t0
    assert out == [0] and ses.decoder.misses == 0 and len(ses.decoder) == 0
    assert took < 1.0, f"the stopped prefetch took {took:.3f} s to end"  # a few ms when quiet (one decode: ~80 ms)
    with pytest.raises(DecodeStopped):  # a stopped stop refuses the next decode at once
        real(ses.result.encoded.embeddings[s].float(), Prompt("box", box=(10.0, 10.0, 90.0, 90.0)), stop=stop)


class _Recording:
    """A backbone that records every prompt it is asked to decode (everything else is the backbone's)."""

    def __init__(self, backbone) -> None:
        self.backbone, self.prompts = backbone, []

    def __getattr__(self, name):
        return getattr(self.__dict__["backbone"], name)

    def decode(self, embedding, prompt, mask_input=None):
        self.prompts.append(prompt)
        return self.backbone.decode(embedding, prompt, mask_input=mask_input)

    def decode_many(self, embedding, prompts):
        return [self.decode(embedding, p) for p in prompts]


@pytest.mark.parametrize("prompt", ["regions", "cog-box", "cog-point"])
def test_decoder_prompts_are_what_redecode_slice_sends(prompt):
    """Every prompt type and moved-point case (fast fake decoder): the prefetch's prompts are the
    ones the real re-decode sends, in its order."""
    from test_live import _regions_result, _result, disc_backbone

    from napari_mias_sam.pipeline.segment import decoder_prompts, redecode_slice

    res, bb = _regions_result() if prompt == "regions" else (_result(), disc_backbone())
    for s in range(res.n_slices):
        for gamma in (1.0, 2.5, 8.0):
            for point, piece in ((None, None), ((100.0, 120.0), 0), ((30.0, 40.0), 1)):
                st = res.settings.replace(prompt=prompt, gamma=gamma)
                rec = _Recording(bb)
                redecode_slice(res, rec, s, settings=st, point=point, piece=piece)
                assert decoder_prompts(res, bb, s, settings=st, point=point, piece=piece) == rec.prompts
