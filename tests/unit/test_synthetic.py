"""bench/synthetic.py: the synthetic catalogue is a pure function of (n, seed, dim) and matches the real schemas."""

from __future__ import annotations

import numpy as np
import orjson

from bench.synthetic import (
    CATEGORIES,
    ItemIds,
    SyntheticCatalog,
    _matches,
    synthetic_settings,
    synthetic_vectors,
)
from infra.milvus import SCALARS, item_rows
from schemas.catalog import ItemRecord
from schemas.features import ItemFeatures
from serving.config import Settings


def test_same_seed_same_catalogue_other_seed_other_vectors() -> None:
    a, b, c = synthetic_vectors(3000, 16, 1), synthetic_vectors(3000, 16, 1), synthetic_vectors(3000, 16, 2)
    assert a.dtype == np.float32 and a.shape == (3000, 16)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_vectors_are_clustered_not_uniform() -> None:
    v = synthetic_vectors(20_000, 64, 3)
    # Uniform unit vectors in 64 dimensions have a best neighbour around 0.5; clustered ones near 1.
    scores = v[:50] @ v.T
    scores[np.arange(50), np.arange(50)] = -1
    assert float(np.median(scores.max(axis=1))) > 0.9


def test_item_ids_are_a_lazy_sequence() -> None:
    ids = ItemIds(1_000_000)
    assert len(ids) == 1_000_000 and ids[0] == "syn0" and ids[-1] == "syn999999"
    assert ids[2:5] == ["syn2", "syn3", "syn4"]


def test_documents_and_rows_follow_the_real_schemas() -> None:
    catalog = SyntheticCatalog(n_items=500, seed=1, dim=8)
    doc = ItemFeatures.model_validate(catalog.document(3))
    assert doc.item_id == "syn3" and doc.category in CATEGORIES and doc.status == "active"
    rows = catalog.rows(0, 500, catalog.vectors())
    # Exactly the fields the real collection has (infra/milvus.item_rows of an ItemRecord).
    real = item_rows([ItemRecord(item_id="x")], np.zeros((1, 8), dtype=np.float32), [False])[0]
    assert set(rows[0]) == set(real) and set(SCALARS) <= set(rows[0])
    everywhere = sum(1 for r in rows if not r["regions"])
    assert 150 < everywhere < 350  # about half the items are shown everywhere
    assert {r["item_id"] for r in rows} == {f"syn{i}" for i in range(500)}


def test_names_and_drop_selection() -> None:
    catalog = SyntheticCatalog(n_items=100_000, seed=2, dim=64)
    assert catalog.collection == "benchsyn_items_100000_s2_d64"
    assert _matches(catalog.collection, 100_000, 2) and _matches(catalog.alias, None, 2)
    assert not _matches(catalog.collection, 1_000_000, None) and not _matches(catalog.alias, 100_000, 1)


def test_synthetic_settings_isolate_redis_keys() -> None:
    s = synthetic_settings(Settings())
    assert s.keys.item_features("syn1").startswith("benchsyn:")
    assert not Settings().keys.item_features("syn1").startswith("benchsyn:")


def test_column_documents_and_columns_are_the_row_ones() -> None:
    catalog = SyntheticCatalog(n_items=3000, seed=2, dim=8)
    assert catalog.documents(100, 2100) == [orjson.dumps(catalog.document(i)) for i in range(100, 2100)]
    vectors = catalog.vectors()
    rows, columns = catalog.rows(10, 60, vectors[10:60]), catalog.columns(10, 60, vectors[10:60])
    assert set(columns) == set(rows[0])
    for name, values in columns.items():
        expected = [row[name] for row in rows]
        assert (np.asarray(values).tolist() if name == "embedding" else list(values)) == expected, name
