"""The index table (bank/indexes.py): every row builds the index it describes, and the memory model
matches the size faiss writes."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from napari_mias_sam.bank import INDEX_TABLE, INDEX_TYPES
from napari_mias_sam.bank.indexes import IndexSink, check_index_type, index_bytes
from napari_mias_sam.core.errors import InputError


@pytest.mark.parametrize("name", INDEX_TYPES)
def test_each_index_type_builds_and_its_memory_model_matches_faiss(name, tmp_path):
    d, n = 64, 4000
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    sink = IndexSink(d, name, expected=n)
    sink.add(x)
    index = sink.finish()
    row = INDEX_TABLE[name]
    assert index.ntotal == n and index.is_trained
    assert ("nlist" in sink.info) == row.inverted_file and ("trained_on" in sink.info) == row.trained
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    size, nlist = index_bytes(n, d, name)
    assert (nlist is not None) == row.inverted_file
    # the model counts vectors, ids and centroids; the file adds headers and small tables
    assert size <= (tmp_path / "i.faiss").stat().st_size <= size * 1.05 + 64 * 1024


def test_unknown_index_type_is_a_one_line_error():
    with pytest.raises(InputError, match="unknown index type 'pq'; choose one of flat, "):
        check_index_type("pq")
