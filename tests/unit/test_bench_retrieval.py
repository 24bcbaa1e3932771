"""bench.retrieval helpers and its summary/plot: exact truth is exact, a result renders."""

from __future__ import annotations

import numpy as np

from bench.__main__ import _retrieval
from bench.retrieval import exact_top, percentiles


def _result() -> dict:
    row = {"items": 1000, "raw_vectors_mb": 0.2, "milvus_rss_mb": {"released": 400, "loaded": 410, "delta": 10},
           "build": {"built_now": True, "insert_rows_per_s": 9000, "index_wait_s": 3.0, "load_s": 1.0},
           "ann_recall": {"@100": 0.99, "@100 region=ca": 0.98, "queries": 100},
           "per_source": {"ann": {"p50_ms": 5.0, "p99_ms": 9.0, "n": 10, "errors": 0}},
           "merged": {"concurrency_1": {"p50_ms": 20.0, "p99_ms": 40.0, "n": 10, "mean_candidates": 900.0,
                                        "skipped": {}},
                      "concurrency_4": {"p50_ms": 60.0, "p99_ms": 140.0, "n": 10, "mean_candidates": 700.0,
                                        "skipped": {"fresh": 3}},
                      "budget_ms": 150.0}}
    return {"machine": {}, "quotas": {"ann": 400}, "index": {"index_type": "HNSW", "params": {"M": 16}},
            "ef_search": 128, "sizes": [row]}


def test_exact_top_matches_a_full_sort_and_honours_the_mask() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 8)).astype(np.float32)
    queries = rng.normal(size=(45, 8)).astype(np.float32)
    mask = rng.random(500) < 0.3
    top = exact_top(vectors, queries, 10)
    masked = exact_top(vectors, queries, 10, mask)
    for q, found, found_masked in zip(queries, top, masked, strict=True):
        scores = vectors @ q
        assert found == set(np.argsort(-scores)[:10].tolist())
        assert found_masked == set(np.argsort(-np.where(mask, scores, -np.inf))[:10].tolist())
        assert all(mask[i] for i in found_masked)


def test_percentiles() -> None:
    p = percentiles([float(x) for x in range(1, 101)])
    assert p["n"] == 100 and 50 <= p["p50_ms"] <= 51 and p["p99_ms"] >= 99


def test_summary_names_every_source_and_both_merged_rows() -> None:
    text = "\n".join(_retrieval(_result()))
    assert "| 1,000 | ann | 5.00 | 9.00 |" in text
    assert "merged**, 1 in flight" in text and "merged**, 4 in flight" in text and "'fresh': 3" in text
    assert "410 MB (+10)" in text


def test_plot_writes_a_png(tmp_path) -> None:
    from bench.plots import plot_retrieval

    path = tmp_path / "retrieval.png"
    plot_retrieval(_result(), path)
    assert path.stat().st_size > 1000
