"""A backbone whose decoder remembers: the same embedding and the same prompt are decoded once.

The viewer decodes the same (slice, prompt) pairs again and again: a gamma that moves no prompt
(the regions prompt does not read gamma), a slider taken back to where it was, a prompt type
tried and left, a rerun whose maps and prompts came out the same, the QA table's "before" decodes.
:class:`CachedDecoder` wraps a backbone (everything but ``decode`` is the backbone's own) and keeps
the last decoder outputs in a least-recently-used store bounded in bytes, keyed by

* the embedding's content (SHA-1 of its float32 bytes, :func:`embedding_digest`; a caller that
  decodes one slice many times hashes it once and says so with :meth:`CachedDecoder.embedding_known`),
* the prompt's exact coordinates and kind,
* the backbone's identity (its :meth:`describe` and the object itself).

A hit returns the very arrays the decoder returned for that input (read-only), so results are
bit-identical with and without the cache. Prompts with a mask input are never cached.
:meth:`CachedDecoder.prefetch` fills an entry ahead of need (the viewer's speculative decodes).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from ..method.prompts import Prompt

__all__ = ["CachedDecoder", "embedding_digest", "DEFAULT_CACHE_BYTES"]

#: Decoder outputs kept per cache: 3 x 256 x 256 float32 logits (768 KiB) per entry, about 170 entries.
DEFAULT_CACHE_BYTES = 128 << 20


def embedding_digest(embedding) -> bytes:
    """SHA-1 of an embedding's values as float32 (what the decoder reads)."""
    t = torch.as_tensor(embedding).detach()
    arr = np.ascontiguousarray(t.to("cpu", torch.float32).numpy())
    return hashlib.sha1(memoryview(arr).cast("B")).digest()


def _prompt_key(prompt: Prompt) -> tuple:
    return (prompt.kind, prompt.point, prompt.box, prompt.boxes)


class CachedDecoder:
    """``backbone`` with a remembering :meth:`decode` (see the module docstring)."""

    def __init__(self, backbone, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if isinstance(backbone, CachedDecoder):
            backbone = backbone.backbone
        self.backbone = backbone
        self.max_bytes = int(max_bytes)
        self._store: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._last: tuple = (None, b"")  # (embedding object, digest): one embedding decoded with several boxes
        desc = backbone.describe() if hasattr(backbone, "describe") else {}
        self._identity = (id(backbone), repr(sorted((str(k), str(v)) for k, v in desc.items())),
                          str(getattr(backbone, "precision", "")), str(getattr(backbone, "device", "")))
        self.hits = 0
        self.misses = 0
        #: Called (no arguments), in the decoding thread, just before a decode that is not remembered
        #: goes to the backbone (the viewer waits on it: see ``viewer/widget_live.py``).
        self.before_decode = None

    def __getattr__(self, name: str):
        # only called for attributes this object does not have: the backbone's own
        return getattr(self.__dict__["backbone"], name)

    @contextmanager
    def embedding_known(self, digest: bytes) -> Iterator[None]:
        """Within this block (this thread), every embedding decoded is the one whose
        :func:`embedding_digest` is ``digest`` (no hashing per call)."""
        old = getattr(self._local, "key", None)
        self._local.key = ("sha1", bytes(digest))
        try:
            yield
        finally:
            self._local.key = old

    def _embedding_key(self, embedding) -> tuple:
        named = getattr(self._local, "key", None)
        if named is not None:
            return named
        with self._lock:
            obj, digest = self._last
            if obj is embedding:
                return ("sha1", digest)
        digest = embedding_digest(embedding)
        with self._lock:
            self._last = (embedding, digest)
        return ("sha1", digest)

    def decode(self, embedding, prompt: Prompt, mask_input=None):
        if mask_input is not None or prompt is None:
            return self.backbone.decode(embedding, prompt, mask_input=mask_input)
        key = (self._identity, self._embedding_key(embedding), _prompt_key(prompt))
        out = self._lookup(key)
        if out is not None:
            return out
        self._announce()
        return self._keep(key, self.backbone.decode(embedding, prompt))

    def _announce(self) -> None:
        hook = self.before_decode
        if hook is not None:
            hook()

    def decode_many(self, embedding, prompts: list[Prompt]) -> list:
        """:meth:`decode` of each prompt on one embedding; the ones not remembered are decoded
        together (the backbone's ``decode_many`` where it has one)."""
        emb_key = self._embedding_key(embedding)
        keys = [(self._identity, emb_key, _prompt_key(p)) for p in prompts]
        outs = [self._lookup(k) for k in keys]
        todo = [i for i, o in enumerate(outs) if o is None]
        if todo:
            self._announce()
            many = getattr(self.backbone, "decode_many", None)
            new = (many(embedding, [prompts[i] for i in todo]) if many is not None and len(todo) > 1
                   else [self.backbone.decode(embedding, prompts[i]) for i in todo])
            for i, out in zip(todo, new):
                outs[i] = self._keep(keys[i], out)
        return outs

    def prefetch(self, embedding, prompt: Prompt | None, stop=None) -> bool:
        """Decode ``prompt`` on ``embedding`` ahead of need and remember it, unless remembered
        already (no hit is counted then); returns whether it decoded. On one core where the
        backbone can (its ``decode_one_thread``, equal to ``decode``'s output bit for bit; ``stop``,
        a :class:`~napari_mias_sam.backbones.base.DecodeStop`, can end that decode at once, and then
        :class:`~napari_mias_sam.backbones.base.DecodeStopped` is raised and nothing is kept), and
        without :attr:`before_decode`: no pass is waiting on this decode (the viewer's prefetch of
        the shown slice at the next gamma values, ``viewer/models/prefetch.py``)."""
        if prompt is None:
            return False
        key = (self._identity, self._embedding_key(embedding), _prompt_key(prompt))
        with self._lock:
            if key in self._store:
                return False
        one = getattr(self.backbone, "decode_one_thread", None)
        out = one(embedding, prompt, stop=stop) if one is not None else self.backbone.decode(embedding, prompt)
        self._keep(key, out)
        return True

    def _lookup(self, key: tuple):
        with self._lock:
            out = self._store.get(key)
            if out is not None:
                self._store.move_to_end(key)
                self.hits += 1
            return out

    def _keep(self, key: tuple, out):
        for arr in (out.logits, out.iou):
            if isinstance(arr, np.ndarray):
                arr.flags.writeable = False
        size = sum(int(getattr(a, "nbytes", 0)) for a in (out.logits, out.iou))
        with self._lock:
            self.misses += 1
            if key not in self._store and size <= self.max_bytes:
                self._store[key] = out
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._store.popitem(last=False)
                    self._bytes -= sum(int(getattr(a, "nbytes", 0)) for a in (old.logits, old.iou))
        return out

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self._bytes = 0
            self._last = (None, b"")

    def __len__(self) -> int:
        return len(self._store)
