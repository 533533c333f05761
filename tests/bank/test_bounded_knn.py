"""The exact k-NN with PCA lower bounds (bank/bounded_knn.py): the same neighbours as a full search,
with and without an excluded range; the calibration it answers equals the full search's, on a
real bank; a bank's CPU search uses it only where it pays."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from napari_mias_sam.bank import build as bank_build
from napari_mias_sam.bank.bounded_knn import BoundedSearcher, bank_matrix
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
    ref = _brute(q, x, k, exclude)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the float32 full search the calibration used before agrees to its own rounding, which is
    # relative to the vectors' squared norms (|q|^2 + |x|^2 - 2 q.x): near-copies show it
    idx = faiss.IndexFlatL2(96)
    idx.add(x)
    scale = float((q**2).sum(1).max() + (x**2).sum(1).max())
    np.testing.assert_allclose(torch_knn(q, idx, k, exclude=exclude), got, rtol=1e-5, atol=2e-6 * scale)


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
    are today's, from a full search of the bank per held-out slice (torch_knn)."""
    feats, ranges, sizes, offsets = _calibration_inputs(sample_bank)
    new = bank_build._calibrate(sample_bank.index, feats, ranges, sizes, offsets=offsets, sigma=4.0, progress=None)
    calls = []

    class FullSearch:  # what _calibrate did before: one full exact search per group of held-out slices
        def __init__(self, index, **_kw):
            self.index = index

        def search(self, q, k, *, exclude=None):
            calls.append(exclude)
            return torch_knn(q, self.index, k, exclude=exclude)

    monkeypatch.setattr(bank_build, "BoundedSearcher", FullSearch)
    old = bank_build._calibrate(sample_bank.index, feats, ranges, sizes, offsets=offsets, sigma=4.0, progress=None)
    assert calls and new["method"] == old["method"] == "leave-one-source-out" and new["n_slices"] == old["n_slices"] > 0
    assert new["per_k"].keys() == old["per_k"].keys()
    for k, lv in old["per_k"].items():
        for name in ("low", "high"):
            assert new["per_k"][k][name] == pytest.approx(lv[name], rel=1e-5), (k, name)
        np.testing.assert_allclose(new["per_k"][k]["slice_max_map"], lv["slice_max_map"], rtol=1e-5)
        np.testing.assert_allclose(new["per_k"][k]["slice_scores"], lv["slice_scores"], rtol=1e-5)
        for q, v in lv["patch_score_quantiles"].items():
            assert new["per_k"][k]["patch_score_quantiles"][q] == pytest.approx(v, rel=1e-5), (k, q)
    # and the bank built by the package holds these levels
    stored = sample_bank.manifest["calibration"]["per_k"]
    assert stored["1"]["low"] == pytest.approx(new["per_k"]["1"]["low"], rel=1e-6)


def test_bank_search_uses_the_bounds_only_where_they_pay(sample_bank):
    q = bank_matrix(sample_bank.index)[:4096] + 0.01
    assert sample_bank._bounded_pays(len(q), 1) and not sample_bank._bounded_pays(8, 1)
    got = sample_bank.search(q, 3)
    ref, _ = sample_bank.index.search(np.ascontiguousarray(q), 3)
    np.testing.assert_allclose(got, np.maximum(ref, 0), rtol=1e-4, atol=1e-4)
    assert sample_bank._bounded is not None


def test_the_bounded_search_is_opt_in(sample_bank, monkeypatch):
    """Off by default: its distances' rounding differs from faiss's, and banks, maps and shards must
    stay byte-identical to a one-process faiss search unless the user asks for it."""
    q = bank_matrix(sample_bank.index)[:4096] + 0.01
    monkeypatch.delenv("MIAS_SAM_BOUNDED_KNN")
    assert not sample_bank._bounded_pays(len(q), 1)
    monkeypatch.setenv("MIAS_SAM_BOUNDED_KNN", "1")
    assert sample_bank._bounded_pays(len(q), 1)
