"""Light and heavy ranking (pure logic)."""

from __future__ import annotations

import numpy as np

from model.ranker import HeavyRanker, RankingData, train_ranker
from serving.pipeline.ranking import FEATURE_NAMES, light_rank, ranking_rows
from serving.pipeline.types import Candidate, UserContext


def test_light_rank_fuses_normalised_sources_and_affinity() -> None:
    candidates = [
        Candidate("a", sources={"ann": 0.9}),
        Candidate("b", sources={"ann": 0.5, "covisit": 40.0}),  # found twice, on another scale
        Candidate("c", sources={"trending": 1000.0}),
        Candidate("d", sources={"ann": 0.1}),
    ]
    items = {"a": {"category": "x"}, "b": {"category": "x"}, "c": {"category": "y"}, "d": {"category": "drama"}}
    ctx = UserContext(user_id="u", category_affinity={"drama": 10.0})
    ranked = light_rank(candidates, ctx, items, {"ann": 1.0, "covisit": 1.0, "trending": 0.3, "affinity": 2.0}, keep=3)
    assert [c.item_id for c in ranked] == ["d", "b", "a"]


def test_ranking_rows_have_one_value_per_name_and_candidate() -> None:
    candidates = [Candidate("a", sources={"ann": 0.4, "trending": 3.0}), Candidate("b", sources={"ann": 0.2})]
    ctx = UserContext(user_id="u", surface="up_next", device="tv", category_affinity={"x": 3.0, "y": 1.0},
                      preferred_categories=["y"])
    items = {"a": {"category": "x", "views": 3, "ctr": 0.1}, "b": {"category": "y", "published_at": 0}}
    rows = ranking_rows(ctx, candidates, items, current_category="y")
    assert [len(row) for row in rows] == [len(FEATURE_NAMES)] * 2
    a, b = (dict(zip(FEATURE_NAMES, row, strict=True)) for row in rows)
    assert a["category_affinity"] == 0.75 and a["surface_up_next"] == 1.0 and a["device_tv"] == 1.0
    assert a["src_ann"] == 1.0 and a["src_covisit"] == 0.0 and a["n_sources"] == 2.0 and a["ctr"] == 0.1
    assert a["log_popularity"] == np.log1p(3) and a["log_age_days"] == np.log1p(3650.0)  # no date: ten years
    # Scaled within the candidates: b has the lowest ann score; its category is preferred and the current one's.
    assert b["src_ann"] == 0.0 and b["src_trending"] == 0.0 and b["category_affinity"] == 0.25
    assert b["preferred_category"] == 1.0 and b["same_category_as_current"] == 1.0 and a["same_category_as_current"] == 0.0
    assert b["log_age_days"] > 8 and b["user_is_cold"] == a["user_is_cold"] == 1.0


def test_heavy_ranker_learns_what_the_light_order_misses(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows, labels, groups, light = [], [], [], []
    affinity = FEATURE_NAMES.index("category_affinity")
    for group in range(300):
        x = rng.random((30, len(FEATURE_NAMES))).astype(np.float32)
        positive = int(rng.integers(5, 30))  # the light order puts it low
        x[positive, affinity] = 1.5  # but it is the one the user's taste predicts
        rows.append(x)
        labels.append(np.eye(30, dtype=np.float32)[positive])
        groups.append(np.full(30, group))
        light.append(positive)
    data = RankingData(np.concatenate(rows), np.concatenate(labels), np.concatenate(groups), np.array(light))
    ranker, metrics = train_ranker(data, epochs=10)
    assert metrics["holdout_ndcg10_heavy"] > 0.8 > metrics["holdout_ndcg10_light"]
    ranker.save(tmp_path)
    loaded = HeavyRanker.load(tmp_path)
    assert loaded is not None
    assert np.allclose(loaded.scores(data.rows[:30]), ranker.scores(data.rows[:30]))


def test_no_saved_ranker_means_none() -> None:
    assert HeavyRanker.load(__import__("pathlib").Path("/nonexistent")) is None
