"""The benchmark metrics and baselines on tiny cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import baselines, metrics


def test_hit_and_ndcg_of_one_held_out_item() -> None:
    recs = ["a", "b", "c"]
    assert metrics.hit_at_k(recs, "b", k=3) == 1.0
    assert metrics.hit_at_k(recs, "c", k=2) == 0.0
    assert metrics.ndcg_at_k(recs, "a") == 1.0
    assert metrics.ndcg_at_k(recs, "b") == pytest.approx(1 / math.log2(3))  # 0.6309
    assert metrics.ndcg_at_k(recs, "c", k=2) == 0.0
    assert metrics.ndcg_at_k(recs, "z") == 0.0


def test_set_metrics_match_recommenders_definitions() -> None:
    recs = ["a", "x", "b", "y"]
    relevant = {"a", "b", "c"}
    assert metrics.precision_at_k(recs, relevant, k=4) == 0.5
    assert metrics.recall_at_k(recs, relevant, k=4) == pytest.approx(2 / 3)
    # DCG = 1 + 1/log2(4) = 1.5; IDCG over min(4, 3) = 3 positions = 1 + 1/log2(3) + 1/2.
    assert metrics.ndcg_set_at_k(recs, relevant, k=4) == pytest.approx(1.5 / (1.5 + 1 / math.log2(3)))
    # AP = (1/1 + 2/3) / |relevant| = (5/3) / 3.
    assert metrics.average_precision_at_k(recs, relevant, k=4) == pytest.approx(5 / 9)
    assert metrics.recall_at_k(recs, set(), k=4) == 0.0


def test_coverage_counts_distinct_items_over_the_catalog() -> None:
    assert metrics.catalog_coverage([["a", "b"], ["b", "c"]], catalog_size=10) == pytest.approx(0.3)
    assert metrics.catalog_coverage([], catalog_size=10) == 0.0


def test_intra_list_diversity_is_mean_pairwise_genre_distance() -> None:
    genres = {"a": {"Drama"}, "b": {"Drama"}, "c": {"Comedy", "Drama"}, "d": {"Horror"}}
    assert metrics.intra_list_diversity(["a", "b"], genres) == 0.0
    assert metrics.intra_list_diversity(["a", "d"], genres) == 1.0
    # pairs: a-b 0, a-c 1 - 1/2, b-c 1/2 -> mean 1/3.
    assert metrics.intra_list_diversity(["a", "b", "c"], genres) == pytest.approx(1 / 3)
    assert metrics.intra_list_diversity(["a"], genres) == 0.0


def test_novelty_rewards_rarely_consumed_items() -> None:
    consumers = {"hit": 7, "niche": 0}
    # p(hit) = (7 + 1) / (7 + 1) = 1 -> 0 bits; p(niche) = 1 / 8 -> 3 bits.
    assert metrics.novelty(["hit"], consumers, n_users=7) == pytest.approx(0.0)
    assert metrics.novelty(["niche"], consumers, n_users=7) == pytest.approx(3.0)
    assert metrics.novelty(["hit", "niche"], consumers, n_users=7) == pytest.approx(1.5)


def test_most_popular_excludes_consumed_and_breaks_ties_by_index() -> None:
    x = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=np.float32)
    w = baselines.most_popular_weights(x)
    assert w.tolist() == [3, 1, 1, 0]
    assert baselines.top_k(x, [2], w, k=3) == [[1, 2, 3]]
    assert baselines.top_k(x, [0], w, k=2) == [[2, 3]]


def test_ease_on_a_toy_matrix_matches_the_closed_form() -> None:
    x = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=np.float32)
    lam = 1.0
    b = baselines.ease_weights(x, l2=lam)
    g = x.T @ x + lam * np.eye(3)
    p = np.linalg.inv(g)
    expected = np.eye(3) - p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(b, expected, atol=1e-5)
    assert np.all(np.diag(b) == 0)
    # Items 0 and 2 co-occur only through item 1: a user with {1} prefers the one seen with 1 more often.
    user = np.array([[0, 1, 0]], dtype=np.float32)
    assert baselines.top_k(user, [0], b, k=2)[0][0] in (0, 2)
    assert 1 not in baselines.top_k(user, [0], b, k=2)[0]


def test_item_knn_scores_by_cosine_neighbours() -> None:
    # Items 0 and 1 always together, item 2 alone: a user with item 0 gets item 1 first.
    x = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32)
    sim = baselines.item_knn_weights(x, neighbours=2)
    assert sim[0, 1] == pytest.approx(1.0)
    assert sim[0, 2] == 0.0
    assert np.all(np.diag(sim) == 0)
    assert baselines.top_k(np.array([[1, 0, 0]], dtype=np.float32), [0], sim, k=1) == [[1]]
