"""The exact k-NN with PCA lower bounds (bank/bounded_knn.py): the same distances as a full search
(torch_knn), bit for bit, with and without an excluded range; the calibration it answers is the full
search's, bit for bit, on a real bank; a bank's CPU search uses it only where it pays, and only
when asked."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from napari_mias_sam.bank import build as bank_build
from napari_mias_sam.bank import bounded_knn
from napari_mias_sam.bank.bounded_knn import BoundedSearcher, bank_matrix, gemm_identity_holds
from napari_mias_sam.bank.knn import torch_knn
from napari_mias_sam.method.patches import GRID



@pytest.fixture(autouse=True)
def _bounded_on(monkeypatch):
    """The bounded search is opt-in (MIAS_SAM_BOUNDED_KNN=1): these tests pin it where it is on."""
    monkeypatch.setenv("MIAS_SAM_BOUNDED_KNN", "1")

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
    monkeypatch.delenv("MIAS_SAM_BOUNDED_KNN")
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
    monkeypatch.delenv("MIAS_SAM_BOUNDED_KNN")
    monkeypatch.setattr(bank_build, "gemm_identity_holds", lambda: False)
    monkeypatch.setattr(BoundedSearcher, "search", lambda *a, **kw: pytest.fail("bounded search used"))
    got = bank_build._calibrate(sample_bank.index, feats, ranges, sizes, offsets=offsets, sigma=4.0, progress=None)
    assert got["per_k"] == sample_bank.manifest["calibration"]["per_k"]


def test_the_blas_identity_probe_runs_once(monkeypatch):
    monkeypatch.setattr(bounded_knn, "_IDENTITY", [])
    held = gemm_identity_holds()  # True with this CI machine's BLAS; False on the H200 machine's 16-core CPU
    assert isinstance(held, bool) and bounded_knn._IDENTITY == [held]
    monkeypatch.setattr(bounded_knn.torch, "addmm", lambda *a, **k: pytest.fail("probed twice"))
    assert gemm_identity_holds() is held


def test_bank_search_uses_the_bounds_only_where_they_pay(sample_bank):
    q = bank_matrix(sample_bank.index)[:4096] + 0.01
    assert sample_bank._bounded_pays(len(q), 1) and not sample_bank._bounded_pays(8, 1)
    got = sample_bank.search(q, 3)
    ref, _ = sample_bank.index.search(np.ascontiguousarray(q), 3)
    np.testing.assert_allclose(got, np.maximum(ref, 0), rtol=1e-4, atol=1e-4)
    assert sample_bank._bounded is not None


def test_the_bounded_search_is_opt_in_for_bank_searches(sample_bank, monkeypatch):
    """A bank's own search stays faiss's unless asked: its distances' rounding differs from the
    bounded search's (torch_knn's arithmetic), and maps must stay byte-identical to a one-process
    faiss search (shards, Dask workers, earlier releases); calibration uses it by default."""
    q = bank_matrix(sample_bank.index)[:4096] + 0.01
    monkeypatch.delenv("MIAS_SAM_BOUNDED_KNN")
    assert not sample_bank._bounded_pays(len(q), 1)
    assert bounded_knn.enabled(default=True)
    monkeypatch.setenv("MIAS_SAM_BOUNDED_KNN", "1")
    assert sample_bank._bounded_pays(len(q), 1)
    monkeypatch.setenv("MIAS_SAM_BOUNDED_KNN", "0")
    assert not bounded_knn.enabled(default=True)
