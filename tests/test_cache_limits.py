"""The embedding cache you can see and bound: a size cap with least-recently-used eviction,
atomic entries, and ``mias-sam cache info|clear|limit``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from napari_mias_sam.pipeline.embedding_cache import DEFAULT_MAX_BYTES, EmbeddingCache, cache_limit
from napari_mias_sam.cli.commands import main

ENTRY = torch.zeros(4, 8, 16, 16)  # 4 * 8 * 16 * 16 * 2 bytes (fp16) + the .npy header
KEYS = [f"{i:064x}" for i in range(1, 6)]


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MIAS_SAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MIAS_SAM_CACHE_MAX_GB", raising=False)
    return tmp_path / "cache"


def _entry_bytes(cache: EmbeddingCache) -> int:
    return cache.path(KEYS[0]).stat().st_size


def _age(cache: EmbeddingCache, key: str, seconds_ago: float) -> None:
    t = os.path.getmtime(cache.path(key)) - seconds_ago
    os.utime(cache.path(key), (t, t))


def test_least_recently_used_entries_are_evicted_beyond_the_cap(cache_home):
    cache = EmbeddingCache(max_bytes=10**9)
    for k in KEYS[:3]:
        cache.put(k, ENTRY)
    size = _entry_bytes(cache)
    for i, k in enumerate(KEYS[:3]):
        _age(cache, k, 100 - i)  # written in order: KEYS[0] oldest
    assert cache.get(KEYS[0]) is not None  # reading KEYS[0] makes KEYS[1] the least recently used
    cache.max_bytes = 3 * size
    cache.put(KEYS[3], ENTRY)  # 4 entries > cap: one goes
    names = {p.stem for p in cache.entries()}
    assert names == {KEYS[0], KEYS[2], KEYS[3]}
    assert cache.size_bytes() <= cache.max_bytes
    cache.max_bytes = size // 2  # smaller than one entry: the entry just written still stays
    cache.put(KEYS[4], ENTRY)
    assert {p.stem for p in cache.entries()} == {KEYS[4]}


def test_default_cap_and_its_settings(cache_home, monkeypatch):
    assert cache_limit() == DEFAULT_MAX_BYTES == 4 * 1024**3
    assert main(["cache", "limit", "1.5G"]) == 0
    assert cache_limit() == int(1.5 * 1024**3) == EmbeddingCache().max_bytes
    monkeypatch.setenv("MIAS_SAM_CACHE_MAX_GB", "0.25")
    assert cache_limit() == 1024**3 // 4
    assert main(["cache", "limit", "lots"]) == 2


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(cache_home, monkeypatch):
    cache = EmbeddingCache()

    def broken_save(fh, arr, allow_pickle=False):
        fh.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cache.put(KEYS[0], ENTRY)
    assert list(cache.root.iterdir()) == []
    assert cache.get(KEYS[0]) is None


def test_temporary_files_are_not_entries(cache_home):
    cache = EmbeddingCache()
    cache.put(KEYS[0], ENTRY)
    (cache.root / f".{KEYS[1]}.npy.abc123.part.npy").write_bytes(b"in progress")
    assert [p.stem for p in cache.entries()] == [KEYS[0]]
    assert cache.size_bytes() == _entry_bytes(cache)


def test_cli_info_and_clear(cache_home, capsys):
    cache = EmbeddingCache()
    for k in KEYS[:2]:
        cache.put(k, ENTRY)
    (cache_home / "weights").mkdir()
    (cache_home / "weights" / "sam_vit_b_01ec64.pth").write_bytes(b"x" * 1000)
    assert main(["cache", "info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["cache_folder"] == str(cache_home)
    assert rep["embeddings"]["entries"] == 2 and rep["embeddings"]["bytes"] == 2 * _entry_bytes(cache)
    assert rep["embeddings"]["max_bytes"] == DEFAULT_MAX_BYTES
    assert rep["other_bytes"]["weights"] == 1000
    assert main(["cache", "info"]) == 0
    text = capsys.readouterr().out
    assert str(cache_home) in text and "2 entries" in text and "4.0 GiB" in text
    assert main(["cache", "clear"]) == 0
    assert "removed 2 cached embeddings" in capsys.readouterr().out
    assert cache.entries() == [] and (cache_home / "weights" / "sam_vit_b_01ec64.pth").is_file()  # weights stay
    assert main(["cache", "clear", "--all"]) == 0
    assert list(cache_home.iterdir()) == []


def test_cli_limit_evicts_at_once(cache_home, capsys):
    cache = EmbeddingCache()
    for i, k in enumerate(KEYS[:3]):
        cache.put(k, ENTRY)
        _age(cache, k, 100 - i)
    size = _entry_bytes(cache)
    assert main(["cache", "limit", f"{size}B"]) == 0  # explicit bytes: a bare number under 1 MiB is a forgotten unit
    assert "removed 2 least recently used" in capsys.readouterr().out
    assert [p.stem for p in cache.entries()] == [KEYS[2]]
