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


def _tiny_log():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime, timedelta

    from demo.movielens import MovieLens
    from schemas.catalog import ItemRecord, UserProfile
    from schemas.events import InteractionEvent

    users = [UserProfile(user_id=f"u{n}") for n in range(3)]
    items = [ItemRecord(item_id=f"i{n}", tags=["Drama" if n % 2 else "Comedy"]) for n in range(6)]
    t0 = datetime(1998, 1, 1, tzinfo=UTC)
    pairs = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 1), (0, 3), (1, 3)]
    events = [InteractionEvent(user_id=f"u{u}", item_id=f"i{i}", interaction_type="watch",
                               timestamp=t0 + timedelta(minutes=k)) for k, (u, i) in enumerate(pairs)]
    return MovieLens(users=users, items=items, interactions=events)


def test_prequential_replay_asks_before_it_ingests_each_chunk() -> None:
    import asyncio

    from bench.quality import Arm, replay

    seen_at_ask: list[tuple[str, int]] = []

    class Spy(Arm):
        name = "spy"

        async def recommend(self, users, state):  # type: ignore[no-untyped-def]
            seen_at_ask.extend((u, state.user_events[u]) for u in users)
            return {u: ["i3"] for u in users}

    data = _tiny_log()
    result = asyncio.run(replay(data, [Spy()], warmup_fraction=0.6, chunk=2, stride=1))
    # Warm-up: the first 6 events; test chunks [(u1,i2),(u2,i1)] and [(u0,i3),(u1,i3)].
    assert result["warmup_events"] == 6 and result["chunks"] == 2
    assert seen_at_ask == [("u1", 2), ("u2", 1), ("u0", 3), ("u1", 3)]
    spy = result["arms"]["spy"]
    assert spy["all"]["events"] == 4
    assert spy["all"]["hr@10"] == 0.5  # i3 is the target of the last two events only
    assert spy["cold_users"]["events"] == 4  # every user had < 5 prior events
    assert spy["coverage"] == round(1 / 6, 4)


def test_most_popular_baseline_in_the_replay_never_recommends_consumed_items() -> None:
    import asyncio

    from bench.quality import MatrixBaseline, replay

    data = _tiny_log()
    arm = MatrixBaseline("most-popular", baselines.most_popular_weights, refit_every=1)
    lists: dict[str, list[str]] = {}
    original = arm.recommend

    async def recording(users, state):  # type: ignore[no-untyped-def]
        out = await original(users, state)
        lists.update(out)
        return out

    arm.recommend = recording  # type: ignore[method-assign]
    asyncio.run(replay(data, [arm], warmup_fraction=0.6, chunk=2, stride=1))
    # Before the last chunk u0 had consumed i0, i1, i2: its list starts with the next most popular.
    assert "i0" not in lists["u0"] and "i1" not in lists["u0"] and "i2" not in lists["u0"]
    assert lists["u0"][0] == "i3"
