"""The exact k-NN with PCA lower bounds (bank/bounded_knn.py): the same distances as a full search
(torch_knn), bit for bit, with and without an excluded range; the calibration it answers is the full
search's, bit for bit, on a real bank; a flat bank's CPU search uses it by default, in one index,
per shard and merged, with the same bits; MIAS_SAM_BOUNDED_KNN=0 gives faiss's search everywhere."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from napari_mias_sam.bank import bounded_knn
from napari_mias_sam.bank import build as bank_build
from napari_mias_sam.bank.bounded_knn import BoundedSearcher, bank_matrix, gemm_identity_holds
from napari_mias_sam.bank.knn import torch_knn
from napari_mias_sam.method.patches import GRID


@pytest.fixture(autouse=True)
def _bounded_default(monkeypatch):
    """The bounded search is on by default (MIAS_SAM_BOUNDED_KNN unset): these tests run it so."""
    monkeypatch.delenv("MIAS_SAM_BOUNDED_KNN", raising=False)

def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Vectors on a few low-dimensional clusters plus noise (a spectrum like patch features')."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d)) * 2.0
    basis = rng.normal(size=(12, 8, d))
    lab = rng.integers(0, 12, n)
    coef = rng.normal(size=(n, 8))
    x = centres[lab] + np.einsum("nk,nkd->nd", coef, basis[lab]) + 0.3 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def _brute(q: np.ndarray, x: np.ndarray, k: int, exclude=None) -> np.ndarray:
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    d = (q64**2).sum(1)[:, None] + (x64**2).sum(1)[None] - 2 * q64 @ x64.T
    if exclude:
        d[:, exclude[0] : exclude[1]] = np.inf
    return np.sort(d, axis=1)[:, :k]


@pytest.mark.parametrize("exclude", [None, (0, 3000), (2500, 4000), (9000, 9500)])
@pytest.mark.parametrize("k", [1, 5])
def test_same_neighbours_as_a_full_search(exclude, k):
    x = _clustered(10_000, 96, seed=1)
    q = np.concatenate([_clustered(300, 96, seed=2), x[::997] + 0.01])  # new vectors and near-copies of bank ones
    bs = BoundedSearcher(x, dims=24, candidates=8, boundaries=[3000, 4000])  # few candidates: the widening rounds run
    got = bs.search(q, k, exclude=exclude)
    idx = faiss.IndexFlatL2(96)
    idx.add(x)
    # the float32 full search the calibration ran before (and runs where the bounds are off): the
    # same values, bit for bit, on a machine whose BLAS passes the probe (elsewhere the calibration
    # never uses the bounds: test_calibration_searches_in_full_where_the_blas_identity_fails)
    if gemm_identity_holds():
        np.testing.assert_array_equal(got.view(np.uint32), torch_knn(q, idx, k, exclude=exclude).view(np.uint32))
    # and the true distances to float32 matrix-product rounding, relative to the squared norms
    scale = float((q**2).sum(1).max() + (x**2).sum(1).max())
    np.testing.assert_allclose(got, _brute(q, x, k, exclude), rtol=1e-5, atol=2e-6 * scale)


def test_a_faiss_index_is_read_without_a_copy_and_fails_cleanly_when_empty():
    x = _clustered(500, 32, seed=3)
    idx = faiss.IndexFlatL2(32)
    idx.add(x)
    m = bank_matrix(idx)
    assert np.shares_memory(m, bank_matrix(idx)) and np.array_equal(m, x)
    bs = BoundedSearcher(idx)
    with pytest.raises(ValueError, match="no bank vectors left"):
        bs.search(x[:3], 1, exclude=(0, 500))
    assert bs.search(x[:3], 10_000).shape == (3, 500)  # k larger than the bank: every vector


def _calibration_inputs(bank):
    """The held-out slices a build calibrated on (rows of the bank) and the sources' ranges."""
    ranges = bank.source_ranges()
    sizes = [int(s["n_slices"]) for s in bank.manifest["sources"]]
    shares = bank_build.calibration_shares(sizes, 48)
    feats, per = [], GRID * GRID
    for gi, ((lo, _), n) in enumerate(zip(ranges, sizes)):
        picks = sorted(set(np.linspace(0, n - 1, min(shares[gi], n)).round().astype(int).tolist()))
        feats += [(gi, s, bank.index.reconstruct_n(lo + s * per, per)) for s in picks]
    offsets = [np.arange(n + 1) * per for n in sizes]
    return feats, ranges, sizes, offsets


def test_calibration_levels_equal_the_full_searches(sample_bank, monkeypatch):
    """The bundled sample's bank (real LiteMedSAM features): the levels answered with the bounds
    (the default) are bit for bit today's, from a full search of the bank per held-out slice
    (``MIAS_SAM_BOUNDED_KNN=0``: search_excluding, torch_knn)."""
    feats, ranges, sizes, offsets = _calibration_inputs(sample_bank)
    used = []
    real = BoundedSearcher.search
    monkeypatch.setattr(BoundedSearcher, "search", lambda self, *a, **kw: used.append(1) or real(self, *a, **kw))
    new = bank_build._calibrate(sample_bank.index, feats, ranges, sizes, offsets=offsets, sigma=4.0, progress=None)
    assert used, "the bounded search is the calibration's default"
    monkeypatch.setenv("MIAS_SAM_BOUNDED_KNN", "0")
    n_used = len(used)
    old = bank_build._calibrate(sample_bank.index, feats, ranges, sizes, offsets=offsets, sigma=4.0, progress=None)
    assert len(used) == n_used, "MIAS_SAM_BOUNDED_KNN=0 searches in full"
    assert new["method"] == old["method"] == "leave-one-source-out" and new["n_slices"] == old["n_slices"] > 0
    assert new == old  # every level, quantile and per-slice value: the same floats
    # and the bank built by the package holds these levels
    assert sample_bank.manifest["calibration"]["per_k"] == new["per_k"]


def test_calibration_searches_in_full_where_the_blas_identity_fails(sample_bank, monkeypatch):
    feats, ranges, sizes, offsets = _calibration_inputs(sample_bank)
    monkeypatch.setattr(bounded_knn, "gemm_identity_holds", lambda: False)
    monkeypatch.setattr(BoundedSearcher, "search", lambda *a, **kw: pytest.fail("bounded search used"))
    got = bank_build._calibrate(sample_bank.index, feats, ranges, sizes, offsets=offsets, sigma=4.0, progress=None)
    assert got["per_k"] == sample_bank.manifest["calibration"]["per_k"]


def test_the_blas_identity_probe_runs_once(monkeypatch):
    monkeypatch.setattr(bounded_knn, "_IDENTITY", [])
    held = gemm_identity_holds()  # True with this CI machine's BLAS; False on the H200 machine's 16-core CPU
    assert isinstance(held, bool) and bounded_knn._IDENTITY == [held]
    monkeypatch.setattr(bounded_knn.torch, "addmm", lambda *a, **k: pytest.fail("probed twice"))
    assert gemm_identity_holds() is held


def _flat(x: np.ndarray) -> faiss.IndexFlatL2:
    idx = faiss.IndexFlatL2(x.shape[1])
    idx.add(x)
    return idx


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_bank_search_is_the_bounded_search_by_default(sample_bank, monkeypatch):
    """A flat bank's CPU search (a slice's 1,024 patches, a batch) returns the bounded search's
    distances, torch_knn's bit for bit where the BLAS probe holds; a few queries get the bits they
    get inside a larger batch (the products are padded to the probed shapes, where torch_knn's
    few-row products use other kernels); the searcher is built once per index and kept."""
    x = bank_matrix(sample_bank.index)
    built = []
    real_init = BoundedSearcher.__init__
    monkeypatch.setattr(BoundedSearcher, "__init__", lambda self, *a, **kw: built.append(1) or real_init(self, *a, **kw))
    monkeypatch.setattr(bounded_knn, "_SEARCHERS", bounded_knn.weakref.WeakKeyDictionary())
    batch = np.concatenate([x[5000:5003] - 0.02, np.random.default_rng(0).normal(size=(70, x.shape[1])).astype(np.float32)])
    for q in (x[:1024] + 0.01, batch):
        got = sample_bank.search(q, 3)
        if gemm_identity_holds():
            assert bounded_knn.torch_arithmetic(sample_bank.index)
            np.testing.assert_array_equal(_bits(got), _bits(torch_knn(q, sample_bank.index, 3)))
        ref, _ = sample_bank.index.search(np.ascontiguousarray(q), 3)
        np.testing.assert_allclose(got, np.maximum(ref, 0), rtol=1e-4, atol=1e-4)
    if gemm_identity_holds():
        np.testing.assert_array_equal(_bits(sample_bank.search(batch[:3], 3)), _bits(sample_bank.search(batch, 3)[:3]))
    assert len(built) == (1 if gemm_identity_holds() else 0)


def test_sharded_and_per_shard_searches_equal_the_one_index_search(monkeypatch):
    """A flat bank cut into shards (aligned, and at odd places, one shard of 5 vectors) answers with
    the one index's distances, bit for bit: ShardedIndex.search_nearest (a sharded bank's search), and
    shard_search per shard (a Dask worker's task) merged as the driver merges them."""
    from napari_mias_sam.bank.shards import ShardedIndex, merge_nearest, shard_search, shard_sizes

    if not gemm_identity_holds():
        pytest.skip("this BLAS fails the probe: every path is faiss's (test_bounded_knn_off_is_faiss_everywhere)")
    x = _clustered(6_000, 96, seed=3)
    q = np.concatenate([_clustered(200, 96, seed=4), x[::613] + 0.01, x[:1]])
    one = _flat(x)
    ref, ids = shard_search(one, q, 5)
    assert ids is None
    np.testing.assert_array_equal(_bits(ref), _bits(torch_knn(q, one, 5)))
    np.testing.assert_array_equal(_bits(shard_search(one, q[:1], 5)[0]), _bits(ref[:1]))  # one query: the same bits
    for cuts in (np.cumsum([0, *shard_sizes(len(x), 3)]), [0, 5, 1029, 4000, 6000]):
        shards = [_flat(x[a:b]) for a, b in zip(cuts, cuts[1:])]
        got, _ = ShardedIndex(shards).search_nearest(q, 5)
        np.testing.assert_array_equal(_bits(got), _bits(ref))
        parts = [shard_search(s, q, 5) for s in shards]
        np.testing.assert_array_equal(_bits(merge_nearest(parts, 5)[0]), _bits(ref))


def test_bounded_knn_off_is_faiss_everywhere(monkeypatch):
    """MIAS_SAM_BOUNDED_KNN=0 (or a BLAS failing the probe): every CPU search is faiss's own, in one
    index, per shard and merged (still the same bits: aligned shards)."""
    from napari_mias_sam.bank.shards import ShardedIndex, merge_nearest, shard_search, shard_sizes

    x = _clustered(5_000, 64, seed=5)
    q = _clustered(100, 64, seed=6)
    one = _flat(x)
    want_d, want_i = one.search(q, 4)
    cuts = np.cumsum([0, *shard_sizes(len(x), 3)])
    shards = [_flat(x[a:b]) for a, b in zip(cuts, cuts[1:])]
    monkeypatch.setattr(BoundedSearcher, "search", lambda *a, **kw: pytest.fail("bounded search used"))
    for how in ("env", "probe"):
        with monkeypatch.context() as mp:
            if how == "env":
                mp.setenv("MIAS_SAM_BOUNDED_KNN", "0")
            else:
                mp.setattr(bounded_knn, "gemm_identity_holds", lambda: False)
            assert not bounded_knn.torch_arithmetic(one)
            d, i = shard_search(one, q, 4)
            np.testing.assert_array_equal(_bits(d), _bits(want_d))
            np.testing.assert_array_equal(i, want_i)
            d, i = ShardedIndex(shards).search_nearest(q, 4)
            np.testing.assert_array_equal(_bits(d), _bits(want_d))
            np.testing.assert_array_equal(i, want_i)
            parts = [shard_search(s, q, 4) for s in shards]
            parts = [(d_, i_ + a) for (d_, i_), a in zip(parts, cuts)]
            np.testing.assert_array_equal(_bits(merge_nearest(parts, 4)[0]), _bits(want_d))
    # bounded=False (the Dask driver's choice passed to its workers) overrides the environment
    d, i = shard_search(one, q, 4, bounded=False)
    np.testing.assert_array_equal(_bits(d), _bits(want_d))


def test_the_bounded_search_is_the_default_for_bank_searches(sample_bank, monkeypatch):
    """On by default for a flat bank's CPU searches and for calibration; MIAS_SAM_BOUNDED_KNN=0
    turns both off; other index types (SQ8, IVF) are always faiss's."""
    assert bounded_knn.enabled() and bounded_knn.enabled(default=True)
    assert bounded_knn.torch_arithmetic(sample_bank.index) == gemm_identity_holds()
    monkeypatch.setenv("MIAS_SAM_BOUNDED_KNN", "0")
    assert not bounded_knn.enabled() and not bounded_knn.torch_arithmetic(sample_bank.index)
    monkeypatch.setenv("MIAS_SAM_BOUNDED_KNN", "1")
    assert bounded_knn.torch_arithmetic(sample_bank.index) == gemm_identity_holds()
    sq8 = faiss.IndexScalarQuantizer(8, faiss.ScalarQuantizer.QT_8bit)
    ip = faiss.IndexFlatIP(8)
    assert not bounded_knn.exact_flat(sq8) and not bounded_knn.exact_flat(ip) and bounded_knn.exact_flat(faiss.IndexFlatL2(8))
