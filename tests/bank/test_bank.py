"""The memory bank: nearest-neighbour scores against brute-force numpy, the leave-one-source-out
calibration, save/load round trips, atomic replacement and the refusals (damaged or mismatched
banks, banks of another backbone)."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
import torch

from fakes import FakeBackbone
from core_fixtures import frames_from_seed, snapshot
from napari_mias_sam.bank import store as bank_mod, MemoryBank, SliceGroup, build_bank, check_compatible, load_bank
from napari_mias_sam.core.errors import BankMismatchError, InputError
from napari_mias_sam.method.patches import patch_features

PREP = {"mode": "minmax", "scope": "volume"}


def brute_sq_dists(x: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """All squared L2 distances in float64 (the expansion is exact to ~1e-12 at these norms)."""
    x64, b64 = x.astype(np.float64), bank.astype(np.float64)
    d = (x64**2).sum(1)[:, None] + (b64**2).sum(1)[None, :] - 2.0 * x64 @ b64.T
    return np.maximum(d, 0.0)


def group(name: str, frames: torch.Tensor, skipped: int = 0) -> SliceGroup:
    return SliceGroup(name=name, n=len(frames), load=lambda: (frames, skipped))


# --------------------------------------------------------------------------- kNN scores
def test_patch_scores_equal_bruteforce_numpy():
    rng = np.random.default_rng(0)
    d = 8
    bank_vecs = rng.normal(size=(300, d)).astype(np.float32)
    index = faiss.IndexFlatL2(d)
    index.add(bank_vecs)
    bank = MemoryBank(index, {"patch_layout": "mean256", "feature_dim": d})
    feats = rng.normal(size=(2, 1024, d)).astype(np.float32)
    q = feats.reshape(-1, d).astype(np.float64)
    dist = ((q[:, None, :] - bank_vecs[None, :, :].astype(np.float64)) ** 2).sum(axis=2)  # plain differences
    np.testing.assert_allclose(brute_sq_dists(feats.reshape(-1, d), bank_vecs), dist, atol=1e-9)
    srt = np.sort(dist, axis=1)

    s1 = bank.patch_scores(feats, k=1)
    assert s1.shape == (2, 32, 32) and s1.dtype == np.float32
    np.testing.assert_allclose(s1.reshape(-1), srt[:, 0], rtol=1e-4, atol=1e-4)
    s3 = bank.patch_scores(torch.from_numpy(feats), k=3)
    np.testing.assert_allclose(s3.reshape(-1), srt[:, :3].mean(axis=1), rtol=1e-4, atol=1e-4)
    # row-major grid: patch p of slice n is scores[n, p // 32, p % 32]
    assert s1[1, 5, 7] == pytest.approx(srt[1024 + 5 * 32 + 7, 0], rel=1e-4)
    # a bank vector queried against itself has distance 0 (never negative)
    self_d = bank.search(bank_vecs[:10], k=1)
    assert (self_d >= 0).all() and np.allclose(self_d, 0, atol=1e-4)
    with pytest.raises(ValueError, match=r"\(M, 8\)"):
        bank.search(np.zeros((3, 5), np.float32))


def test_build_bank_indexes_the_backbone_patches_and_scores_match_bruteforce():
    fake = FakeBackbone()
    g1, g2 = frames_from_seed(2, 11), frames_from_seed(3, 12)
    bank = build_bank([group("a", g1, skipped=1), group("b", g2)], fake, layout="mean256", preprocessing=PREP, batch_size=2)
    expected = torch.cat([patch_features(fake.encode(g1), "mean256"), patch_features(fake.encode(g2), "mean256")]).reshape(-1, 256).numpy()
    assert bank.ntotal == 5 * 1024 and bank.dim == 256
    np.testing.assert_array_equal(bank.index.reconstruct_n(0, bank.ntotal), expected)
    m = bank.manifest
    assert m["backbone"] == fake.describe()
    assert m["counts"] == {"slices": 5, "patches": 5 * 1024, "skipped_empty_slices": 1}
    assert [s["name"] for s in m["sources"]] == ["a", "b"]
    assert m["index"]["metric"] == "squared_l2" and m["patch_layout"] == "mean256" and m["feature_dim"] == 256

    test = patch_features(fake.encode(frames_from_seed(1, 99)), "mean256").numpy()
    srt = np.sort(brute_sq_dists(test.reshape(-1, 256), expected), axis=1)
    # faiss computes |x|^2 + |y|^2 - 2 x.y in float32: absolute error ~1e-4 at these norms (~190)
    np.testing.assert_allclose(bank.patch_scores(test, 1).reshape(-1), srt[:, 0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(bank.patch_scores(test, 3).reshape(-1), srt[:, :3].mean(axis=1), rtol=1e-4, atol=1e-3)
    assert srt[:, 0].max() > 0.1  # the comparison is not all near-zero distances


def test_build_bank_refuses_empty_input():
    fake = FakeBackbone()
    with pytest.raises(InputError, match="no normal sources"):
        build_bank([], fake, preprocessing=PREP)
    with pytest.raises(InputError, match="no normal slices with anatomy"):
        build_bank([SliceGroup("empty", 2, lambda: (torch.zeros(0, 256, 256), 2))], fake, preprocessing=PREP)
    with pytest.raises(InputError, match="unknown patch layout"):
        build_bank([group("a", frames_from_seed(1, 1))], fake, layout="mean512", preprocessing=PREP)


# --------------------------------------------------------------------------- calibration
def test_calibration_leaves_the_own_source_out():
    """Group A holds three identical slices: scored against a bank that still held A, their
    nearest-neighbour distances would all be 0. The calibration must exclude A for A's slices."""
    fake = FakeBackbone()
    a = frames_from_seed(1, 1).repeat(3, 1, 1)
    b = frames_from_seed(3, 2)
    bank = build_bank([group("A", a), group("B", b)], fake, layout="mean256", preprocessing=PREP)
    cal = bank.manifest["calibration"]
    assert cal["method"] == "leave-one-source-out"
    assert cal["n_slices"] == 6
    assert sorted(cal["per_k"]) == ["1", "2", "3", "4", "5"]

    fa = patch_features(fake.encode(a), "mean256").numpy()
    fb = patch_features(fake.encode(b), "mean256").numpy()
    d_ab = brute_sq_dists(fa[0], fb.reshape(-1, 256))  # A's slices are all the same
    for k in (1, 3):
        scores = cal["per_k"][str(k)]["slice_scores"]
        expected_a = np.sort(d_ab, axis=1)[:, :k].mean(axis=1).max()
        assert scores[:3] == pytest.approx([expected_a] * 3, rel=1e-4, abs=1e-3)
        assert min(scores[:3]) > 0.01  # not 0: A's own identical slices were excluded
        for j in range(3):  # B's slices are scored against A's three (identical) slices only
            d_ba = brute_sq_dists(fb[j], fa.reshape(-1, 256))
            assert scores[3 + j] == pytest.approx(np.sort(d_ba, axis=1)[:, :k].mean(axis=1).max(), rel=1e-4, abs=1e-3)
    # the calibration's scale: high = 99th percentile of the held-out slices' map maxima
    per1 = cal["per_k"]["1"]
    assert per1["high"] == pytest.approx(np.percentile(per1["slice_max_map"], 99))
    c = bank.calibration(1)
    assert (c.low, c.high) == (per1["low"], per1["high"]) and c.high > c.low
    assert bank.calibration(7).high == cal["per_k"]["5"]["high"]  # larger k falls back to the largest stored


def test_calibration_with_one_source_leaves_neighbouring_slices_out():
    fake = FakeBackbone()
    frames = frames_from_seed(4, 5)
    bank = build_bank([group("only", frames)], fake, layout="mean256", preprocessing=PREP)
    cal = bank.manifest["calibration"]
    assert cal["method"] == "leave-neighbouring-slices-out" and cal["n_slices"] == 4
    f = patch_features(fake.encode(frames), "mean256").numpy()
    # slice 0 (margin 1) is scored against slices 2 and 3 only
    d = brute_sq_dists(f[0], f[2:].reshape(-1, 256))
    assert cal["per_k"]["1"]["slice_scores"][0] == pytest.approx(np.sort(d, axis=1)[:, 0].max(), rel=1e-4, abs=1e-3)


def test_bank_without_calibration_refuses_calibrated_use():
    bank = MemoryBank(faiss.IndexFlatL2(4), {"patch_layout": "mean256", "feature_dim": 4, "calibration": {"per_k": {}}})
    with pytest.raises(BankMismatchError, match="no calibration"):
        bank.calibration(1)


# --------------------------------------------------------------------------- save / load
@pytest.fixture(scope="module")
def small_bank():
    fake = FakeBackbone()
    return build_bank(
        [group("a", frames_from_seed(2, 21)), group("b", frames_from_seed(2, 22))], fake, layout="mean256", preprocessing=PREP
    )


def test_save_load_round_trip(small_bank, tmp_path):
    path = small_bank.save(tmp_path / "bank")
    assert sorted(p.name for p in path.iterdir()) == ["index.faiss", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no temporary folder left
    loaded = load_bank(path)
    assert loaded.ntotal == small_bank.ntotal == 4 * 1024
    assert loaded.dim == small_bank.dim == 256
    for key in ("format", "format_version", "backbone", "preprocessing", "slice_axis", "patch_layout", "feature_dim",
                "patch", "counts", "sources", "calibration", "created"):
        assert loaded.manifest[key] == small_bank.manifest[key], key
    assert loaded.manifest["index"]["ntotal"] == 4 * 1024 and loaded.manifest["index"]["file"] == "index.faiss"
    q = np.random.default_rng(3).normal(size=(50, 256)).astype(np.float32)
    np.testing.assert_array_equal(loaded.search(q, 4), small_bank.search(q, 4))
    np.testing.assert_array_equal(load_bank(path, mmap=True).search(q, 2), small_bank.search(q, 2))
    assert "4,096 patches" in loaded.summary()


def test_save_refuses_existing_and_non_bank_folders(small_bank, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = snapshot(other)
    with pytest.raises(InputError, match="already exists"):
        small_bank.save(other)
    with pytest.raises(InputError, match="not a memory bank folder"):
        small_bank.save(other, overwrite=True)
    assert snapshot(other) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_overwrite_replaces_a_bank_atomically(small_bank, tmp_path, monkeypatch):
    fake = FakeBackbone()
    path = small_bank.save(tmp_path / "bank")
    bigger = build_bank([group("c", frames_from_seed(3, 31)), group("d", frames_from_seed(1, 32))], fake, layout="mean256", preprocessing=PREP)
    bigger.save(path, overwrite=True)
    assert load_bank(path).ntotal == 4 * 1024 and sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
    before = snapshot(path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bank_mod.faiss, "write_index", boom)
    with pytest.raises(OSError, match="disk full"):
        small_bank.save(path, overwrite=True)
    assert snapshot(path) == before  # the previous bank is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # and no temporary folder is left


@pytest.fixture()
def saved_bank(small_bank, tmp_path):
    return small_bank.save(tmp_path / "bank")


@pytest.mark.parametrize(
    "damage",
    ["truncated", "not-json", "a-list", "missing-fields", "wrong-format"],
)
def test_damaged_manifest_is_an_input_error(saved_bank, damage):
    mf = saved_bank / "manifest.json"
    text = mf.read_text()
    if damage == "truncated":
        mf.write_text(text[: len(text) // 2])
    elif damage == "not-json":
        mf.write_bytes(b"\x00\x01garbage")
    elif damage == "a-list":
        mf.write_text("[]")
    elif damage == "missing-fields":
        m = json.loads(text)
        del m["feature_dim"]
        mf.write_text(json.dumps(m))
    else:
        m = json.loads(text)
        m["format"] = "something else"
        mf.write_text(json.dumps(m))
    with pytest.raises(InputError) as exc:
        load_bank(saved_bank)
    assert str(saved_bank) in str(exc.value)


def test_index_manifest_mismatch_is_an_input_error(saved_bank, tmp_path):
    mf = saved_bank / "manifest.json"
    m = json.loads(mf.read_text())
    m["index"]["ntotal"] = 1234
    mf.write_text(json.dumps(m))
    with pytest.raises(InputError, match="does not match its manifest"):
        load_bank(saved_bank)
    # an index of another dimension
    m["index"]["ntotal"] = 4 * 1024
    mf.write_text(json.dumps(m))
    faiss.write_index(faiss.IndexFlatL2(128), str(saved_bank / "index.faiss"))
    with pytest.raises(InputError, match="does not match its manifest"):
        load_bank(saved_bank)
    # a damaged and a missing index file
    (saved_bank / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(InputError, match="cannot read the faiss index"):
        load_bank(saved_bank)
    (saved_bank / "index.faiss").unlink()
    with pytest.raises(InputError, match="missing"):
        load_bank(saved_bank)
    with pytest.raises(InputError, match="not a memory bank folder"):
        load_bank(tmp_path / "nowhere")


def test_bank_of_another_backbone_is_refused(saved_bank):
    bank = load_bank(saved_bank)
    same = FakeBackbone().describe()
    check_compatible(bank, same)  # same name and weights: accepted
    check_compatible(bank, same, preprocessing={"mode": "minmax"})

    other_weights = dict(same, weights_sha256="0123456789abcdef-other")
    with pytest.raises(BankMismatchError) as exc:
        check_compatible(bank, other_weights)
    msg = str(exc.value)
    assert "fake-weights" in msg and "0123456789ab" in msg and str(saved_bank) in msg

    lite = {"name": "litemedsam", "weights_sha256": "79d8c9dca6db4d69"}
    with pytest.raises(BankMismatchError) as exc:
        check_compatible(bank, lite)
    msg = str(exc.value)
    assert "backbone fake" in msg and "selected backbone is litemedsam" in msg and "rebuild" in msg

    with pytest.raises(BankMismatchError, match="'minmax' preprocessing"):
        check_compatible(bank, same, preprocessing={"mode": "ct"})

    # a manifest edited to name other weights is refused as well
    mf = saved_bank / "manifest.json"
    m = json.loads(mf.read_text())
    m["backbone"]["weights_sha256"] = "feedface" * 8
    mf.write_text(json.dumps(m))
    with pytest.raises(BankMismatchError, match="feedface"):
        check_compatible(load_bank(saved_bank), same)


def test_copied_bank_folder_loads(saved_bank, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved_bank, copy)
    assert load_bank(copy).ntotal == 4 * 1024
