"""Sharded banks and staged builds (bank/shards.py, bank/staging.py): a bank staged source by
source, in one file or in shards, is the streaming build's bank (vectors, neighbours, calibration);
sharded searches give one index's neighbours; the manifest records the shards; an interrupted
staged build resumes from the sources already staged."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch

from fakes import FakeBackbone
from core_fixtures import frames_from_seed
from napari_mias_sam.bank import SliceGroup, build_bank, load_bank
from napari_mias_sam.bank.build import make_plan
from napari_mias_sam.bank.knn import index_vectors
from napari_mias_sam.bank.shards import SHARD_ALIGN, ShardedIndex, ShardSink, search_excluding, shard_search, shard_sizes
from napari_mias_sam.bank.staging import StagingArea, build_bank_staged, staging_dir
from napari_mias_sam.core.errors import Cancelled, InputError

PREP = {"mode": "minmax", "scope": "volume"}


def group(name: str, frames: torch.Tensor, calls: list | None = None) -> SliceGroup:
    def load():
        if calls is not None:
            calls.append(name)
        return frames, 1, list(range(len(frames)))

    return SliceGroup(name=name, n=len(frames) + 1, load=load)


def groups_of(calls: list | None = None) -> list[SliceGroup]:
    frames = frames_from_seed(7, seed=21)
    return [group("a", frames[:3], calls), group("b", frames[3:5], calls), group("c", frames[5:], calls)]


def vectors(bank) -> np.ndarray:
    return index_vectors(bank.index, 0, bank.ntotal)


def same_bank(a, b) -> None:
    np.testing.assert_array_equal(vectors(a), vectors(b))
    assert a.manifest["calibration"] == b.manifest["calibration"]
    assert a.manifest["sources"] == b.manifest["sources"]
    for key in ("counts", "patch_layout", "feature_dim", "backbone", "preprocessing", "slice_axis", "coreset"):
        assert a.manifest.get(key) == b.manifest.get(key), key
    strip = lambda m: {k: v for k, v in m["index"].items() if k not in ("file", "shards", "shard_align")}
    assert strip(a.manifest) == strip(b.manifest)


def test_shard_sizes_are_aligned_and_cover_the_bank():
    assert shard_sizes(10 * SHARD_ALIGN + 5, 3) == [4 * SHARD_ALIGN, 4 * SHARD_ALIGN, 2 * SHARD_ALIGN + 5]
    assert shard_sizes(100, 4) == [100]  # smaller than one block: one shard
    assert shard_sizes(0, 2) == []
    for n, s in ((5000, 2), (123_456, 7), (1024 * 9, 3)):
        sizes = shard_sizes(n, s)
        assert sum(sizes) == n and len(sizes) <= s and all(x % SHARD_ALIGN == 0 for x in sizes[:-1])


@pytest.mark.parametrize("index_type", ["flat", "flat-sq8", "ivf"])
def test_sharded_index_gives_one_index_neighbours(index_type, tmp_path):
    rng = np.random.default_rng(1)
    d, n = 32, 5 * SHARD_ALIGN + 300
    x = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal((300, d)).astype(np.float32)
    from napari_mias_sam.bank.indexes import IndexSink

    one = IndexSink(d, index_type, n)
    one.add(x)
    single = one.finish()
    sink = ShardSink(d, index_type, n, shard_sizes(n, 3), tmp_path)
    for r0 in range(0, n, 777):  # other blocks than the single index got
        sink.add(x[r0 : r0 + 777])
    entries = sink.finish()
    assert [e["ntotal"] for e in entries] == shard_sizes(n, 3) and len(entries) == 3
    sharded = ShardedIndex([faiss.read_index(str(tmp_path / e["file"]), faiss.IO_FLAG_MMAP) for e in entries])
    if "nprobe" in one.info:
        sharded.set_nprobe(one.info["nprobe"])
    assert sharded.ntotal == n
    np.testing.assert_array_equal(sharded.reconstruct_n(SHARD_ALIGN * 2 - 5, 20), index_vectors(single, SHARD_ALIGN * 2 - 5, SHARD_ALIGN * 2 + 15))
    d1, i1 = single.search(q, 4)
    d2, i2 = sharded.search(q, 4)
    np.testing.assert_array_equal(i2, i1)  # the same neighbours
    np.testing.assert_array_equal(d2, d1)  # and bit-identical distances (aligned shard boundaries)
    # as a bank searches (a flat index: the bounded search, no ids, where the BLAS probe holds)
    d1, i1 = shard_search(single, q, 4)
    d2, i2 = sharded.search_nearest(q, 4)
    if i1 is None:
        assert index_type == "flat" and i2 is None
    else:
        np.testing.assert_array_equal(i2, i1)
    np.testing.assert_array_equal(d2, d1)
    for exclude in ((0, 10), (SHARD_ALIGN * 2 - 50, SHARD_ALIGN * 4 + 3), (n - 100, n)):
        np.testing.assert_array_equal(search_excluding(sharded, q[:64], 3, exclude), search_excluding(single, q[:64], 3, exclude))


@pytest.mark.parametrize("shards,index_type,coreset", [(1, "flat", None), (2, "flat", None), (3, "ivf", None), (2, "flat", 0.3)])
def test_staged_build_is_the_streaming_build(shards, index_type, coreset, tmp_path):
    bb = FakeBackbone()
    ref = build_bank(groups_of(), bb, layout="mean256", preprocessing=PREP, index_type=index_type, coreset_ratio=coreset,
                     calibration_slices=4)
    groups = groups_of()
    plan = make_plan(groups, layout="mean256", index_type=index_type, preprocessing=PREP, slice_axis="axial",
                     calibration_slices=4, coreset_ratio=coreset, shards=shards)
    staged = build_bank_staged(groups, plan, tmp_path / ".b.mias-sam-staging", backbone=bb)
    same_bank(staged, ref)
    assert staged.shards == (min(shards, len(shard_sizes(staged.ntotal, shards))))
    q = np.random.default_rng(2).standard_normal((50, 256)).astype(np.float32)
    np.testing.assert_array_equal(staged.search(q, 2), ref.search(q, 2))
    # saved and loaded: the shards are recorded in the manifest and memory-mapped
    loaded = load_bank(staged.save(tmp_path / "b"))
    same_bank(loaded, ref)
    np.testing.assert_array_equal(loaded.search(q, 2), ref.search(q, 2))
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    if staged.shards > 1:
        assert m["format_version"] == 2 and "file" not in m["index"]
        assert [e["ntotal"] for e in m["index"]["shards"]] == shard_sizes(ref.ntotal, shards)
        assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted([e["file"] for e in m["index"]["shards"]] + ["manifest.json"])
        assert f"in {staged.shards} shards" in loaded.summary()
    else:
        assert m["format_version"] == 1 and m["index"]["file"] == "index.faiss" and "shards" not in m["index"]


def test_sharded_manifest_is_checked(tmp_path):
    bb = FakeBackbone()
    groups = groups_of()
    plan = make_plan(groups, layout="paper1024", index_type="flat", preprocessing=PREP, slice_axis="axial", shards=2)
    bank = build_bank_staged(groups, plan, tmp_path / "st", backbone=bb)
    path = bank.save(tmp_path / "b")
    mf = path / "manifest.json"
    good = json.loads(mf.read_text())
    for edit, msg in ((lambda m: m["index"]["shards"][0].update(file="../x.faiss"), "'index.shards' .* outside the bank folder"),
                      (lambda m: m["index"]["shards"][1].update(ntotal=5), "'index.shards' holds .* in all"),
                      (lambda m: m["index"]["shards"].clear(), "index.shards")):
        m = json.loads(json.dumps(good))
        edit(m)
        mf.write_text(json.dumps(m))
        with pytest.raises(InputError, match=msg):
            load_bank(path)
    mf.write_text(json.dumps(good))
    (path / good["index"]["shards"][1]["file"]).unlink()
    with pytest.raises(InputError, match="missing; the bank folder is incomplete"):
        load_bank(path)


def test_interrupted_staged_build_resumes_from_staged_sources(tmp_path):
    bb = FakeBackbone()
    ref = build_bank(groups_of(), bb, layout="mean256", preprocessing=PREP, calibration_slices=4)
    stage = staging_dir(tmp_path / "bank")
    calls: list = []
    groups = groups_of(calls)
    plan = make_plan(groups, layout="mean256", index_type="flat", preprocessing=PREP, slice_axis="axial", calibration_slices=4, shards=2)
    n = {"batches": 0}

    def cancel_in_third_source() -> bool:
        n["batches"] += 1
        return calls == ["a", "b", "c"]

    with pytest.raises(Cancelled):
        build_bank_staged(groups, plan, stage, backbone=bb, cancelled=cancel_in_third_source)
    assert StagingArea(stage).staged() == [0, 1]
    assert not list(stage.glob(".*part*"))  # the interrupted source left nothing behind
    with pytest.raises(InputError, match="--resume to continue"):
        build_bank_staged(groups, plan, stage, backbone=bb)
    calls.clear()
    bank = build_bank_staged(groups, plan, stage, backbone=bb, resume=True)
    assert calls == ["c"]  # only the missing source was encoded again
    same_bank(bank, ref)
    # other options: the staged sources do not match and are encoded again
    calls.clear()
    other = make_plan(groups, layout="mean256", index_type="flat", preprocessing=PREP, slice_axis="axial", calibration_slices=4,
                      coreset_ratio=0.5, shards=2)
    build_bank_staged(groups, other, stage, backbone=bb, resume=True)
    assert calls == ["a", "b", "c"]
