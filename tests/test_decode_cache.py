"""The remembering decoder (pipeline/decode_cache.py): a hit returns the very decoder output for the
same embedding and prompt; anything else (another embedding, prompt, backbone, a mask input) decodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakes import FakeBackbone
from napari_mias_sam.method.prompts import Prompt
from napari_mias_sam.pipeline.decode_cache import CachedDecoder, embedding_digest


def _emb(seed: int) -> torch.Tensor:
    return torch.randn((256, 64, 64), generator=torch.Generator().manual_seed(seed)).half()


def test_same_embedding_and_prompt_decode_once():
    bb = FakeBackbone()
    dec = CachedDecoder(bb)
    e = _emb(0)
    box = Prompt("box", box=(10.0, 20.0, 60.0, 90.0))
    a = dec.decode(e.float(), box)
    b = dec.decode(e.float(), Prompt("box", box=(10.0, 20.0, 60.0, 90.0)))  # a new tensor, same values
    assert bb.decode_calls == 1 and b is a and dec.hits == 1
    ref = bb.decode(e.float(), box)
    np.testing.assert_array_equal(a.logits, ref.logits)
    with pytest.raises(ValueError):  # the remembered arrays cannot be changed under the cache
        a.logits[0, 0, 0] = 1.0
    dec.decode(e.float(), Prompt("box", box=(10.0, 20.0, 60.0, 90.5)))  # another prompt
    dec.decode(_emb(1).float(), box)  # another embedding
    dec.decode(e.float(), box, mask_input=torch.zeros(256, 256))  # a mask input: never remembered
    assert bb.decode_calls == 1 + 1 + 1 + 2
    assert dec.name == bb.name and dec.describe is not None  # everything else is the backbone's


def test_a_named_embedding_skips_the_hash_and_shares_entries():
    bb = FakeBackbone()
    dec = CachedDecoder(bb)
    e = _emb(2)
    p = Prompt("point", point=(30.0, 40.0))
    with dec.embedding_known(embedding_digest(e)):
        first = dec.decode(e.float(), p)
    assert dec.decode(e.float(), p) is first and bb.decode_calls == 1


def test_another_backbone_never_reads_the_entries_and_the_store_is_bounded():
    a, b = FakeBackbone(sha="a"), FakeBackbone(sha="b")
    dec_a = CachedDecoder(a, max_bytes=3 * (3 * 256 * 256 * 4 + 12))
    e = _emb(3)
    p = Prompt("box", box=(1.0, 2.0, 30.0, 40.0))
    dec_a.decode(e.float(), p)
    dec_b = CachedDecoder(b)
    dec_b.decode(e.float(), p)
    assert b.decode_calls == 1
    for i in range(5):
        dec_a.decode(e.float(), Prompt("box", box=(1.0, 2.0, 30.0 + i, 40.0)))
    assert len(dec_a) == 3  # the least recently used went
    assert CachedDecoder(dec_a).backbone is a  # wrapping a cached decoder wraps its backbone


def test_prefetch_fills_an_entry_without_announcing_it():
    """A decode ahead of need (the viewer's prefetch): remembered, counted as a miss, no hit, no
    before_decode call (no pass waits on it); a second prefetch of the same prompt decodes nothing,
    and the later decode is a hit on the very arrays."""
    bb = FakeBackbone()
    dec = CachedDecoder(bb)
    announced = []
    dec.before_decode = lambda: announced.append(1)
    e = _emb(4)
    box = Prompt("box", box=(5.0, 6.0, 70.0, 80.0))
    assert dec.prefetch(e.float(), box) and dec.misses == 1 and dec.hits == 0 and not announced
    assert not dec.prefetch(e.float(), box) and bb.decode_calls == 1 and dec.hits == 0
    out = dec.decode(e.float(), box)
    assert bb.decode_calls == 1 and dec.hits == 1 and not announced
    np.testing.assert_array_equal(out.logits, bb.decode(e.float(), box).logits)
    assert not dec.prefetch(e.float(), None)
