"""The re-ranking policy engine (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from serving.pipeline.policies import PolicyConfig, PolicyEngine
from serving.pipeline.types import Candidate, UserContext

NOW = datetime(2024, 6, 1, tzinfo=UTC)


def ranked(n: int, prefix: str = "i") -> list[Candidate]:
    return [Candidate(item_id=f"{prefix}{k}", sources={"ann": 1.0}, score=1.0 - k / 1000) for k in range(n)]


def catalog(n: int, prefix: str = "i", **fields: object) -> dict[str, dict[str, object]]:
    return {f"{prefix}{k}": {"status": "active", "category": f"c{k % 10}", "maturity_rating": "PG", **fields} for k in range(n)}


def engine(**overrides: object) -> PolicyEngine:
    config = PolicyConfig.model_validate({"exploration": {"enabled": False}, "freshness": {"weight": 0}, **overrides})
    return PolicyEngine(config, seed=7)


def test_shipped_policy_file_is_valid() -> None:
    config = PolicyConfig.load()
    assert config.filters.status and config.maturity.enabled


def test_hard_filters_drop_status_region_consumed_skipped_current_and_blocked() -> None:
    items = catalog(10)
    items["i1"]["status"] = "deleted"
    items["i2"]["regions"] = ["us-west"]
    ctx = UserContext(user_id="u", limit=10, region="us-east", age_bucket="25-34", consumed={"i3"}, skipped={"i4"},
                      current_item_id="i5", now=NOW)
    page = engine(filters={"blocked_items": ["i6"]}).rerank(ranked(10), items, ctx)
    assert [c.item_id for c in page] == ["i0", "i7", "i8", "i9"]


def test_maturity_follows_age_bucket_and_is_conservative_for_unknown_age() -> None:
    items = catalog(3)
    items["i0"]["maturity_rating"] = "R"
    items["i1"]["maturity_rating"] = "PG-13"
    items["i2"]["maturity_rating"] = None  # unrated counts as PG
    teen = UserContext(user_id="t", limit=10, age_bucket="<18", now=NOW)
    adult = UserContext(user_id="a", limit=10, age_bucket="35-44", now=NOW)
    unknown = UserContext(user_id="n", limit=10, now=NOW)
    assert [c.item_id for c in engine().rerank(ranked(3), items, teen)] == ["i1", "i2"]
    assert [c.item_id for c in engine().rerank(ranked(3), items, adult)] == ["i0", "i1", "i2"]
    assert [c.item_id for c in engine().rerank(ranked(3), items, unknown)] == ["i1", "i2"]


def test_items_missing_from_the_catalog_are_never_shown() -> None:
    ctx = UserContext(user_id="u", limit=5, age_bucket="25-34", now=NOW)
    page = engine().rerank(ranked(3), catalog(2), ctx)
    assert [c.item_id for c in page] == ["i0", "i1"]


def test_diversity_caps_a_category_per_page_and_says_so() -> None:
    items = {f"i{k}": {"status": "active", "category": "drama" if k < 8 else "comedy"} for k in range(12)}
    ctx = UserContext(user_id="u", limit=6, age_bucket="25-34", now=NOW)
    page = engine(diversity={"max_per_category": 3}).rerank(ranked(12), items, ctx)
    assert [items[c.item_id]["category"] for c in page].count("drama") == 3
    assert [c.item_id for c in page][:3] == ["i0", "i1", "i2"]
    assert all("rule:diversity" not in c.reasons for c in page)


def test_diversity_refills_the_page_when_there_is_nothing_else() -> None:
    items = {f"i{k}": {"status": "active", "category": "drama"} for k in range(5)}
    ctx = UserContext(user_id="u", limit=5, age_bucket="25-34", now=NOW)
    assert len(engine(diversity={"max_per_category": 2}).rerank(ranked(5), items, ctx)) == 5


def test_freshness_boost_lifts_a_new_item_over_a_slightly_better_old_one() -> None:
    items = catalog(2)
    items["i0"]["published_at"] = (NOW - timedelta(days=3000)).isoformat()
    items["i1"]["published_at"] = (NOW - timedelta(days=1)).isoformat()
    ctx = UserContext(user_id="u", limit=2, age_bucket="25-34", now=NOW)
    page = engine(freshness={"weight": 0.05, "half_life_days": 30}).rerank(ranked(2), items, ctx)
    assert [c.item_id for c in page] == ["i1", "i0"] and "rule:freshness" in page[0].reasons


def test_exposure_cap_hides_an_item_shown_too_often_today() -> None:
    ctx = UserContext(user_id="u", limit=3, age_bucket="25-34", now=NOW)
    page = engine(exposure={"per_user_item": 2}).rerank(ranked(4), catalog(4), ctx, exposure={"i0": 2, "i1": 1})
    assert [c.item_id for c in page] == ["i1", "i2", "i3"]


def test_exploration_fills_lower_slots_from_below_the_page_with_new_items_throttled() -> None:
    items = catalog(40)
    for k in range(40):
        items[f"i{k}"].update(impressions=1000, clicks=10)
    for k in range(20, 40):
        items[f"i{k}"].update(impressions=0, clicks=0)  # brand new: high-variance posteriors
    ctx = UserContext(user_id="u", limit=10, age_bucket="25-34", now=NOW)
    config = {"exploration": {"enabled": True, "positions": [7, 8, 9], "new_item_share": 0.34}, "diversity": {"max_per_category": 10}}
    page = engine(**config).rerank(ranked(40), items, ctx)
    explored = [c for c in page if "rule:exploration" in c.reasons]
    assert [page.index(c) for c in explored] == [7, 8, 9]
    assert [c.item_id for c in page[:7]] == [f"i{k}" for k in range(7)]
    assert sum(1 for c in explored if items[c.item_id]["impressions"] == 0) <= 1


def test_pinned_item_takes_its_position_but_only_where_allowed() -> None:
    items = catalog(10)
    items["p"] = {"status": "active", "category": "news", "maturity_rating": "PG"}
    items["r"] = {"status": "active", "category": "news", "maturity_rating": "R"}
    pins = [{"item_id": "p", "position": 2, "surfaces": ["homepage"]},
            {"item_id": "r", "position": 0, "surfaces": ["homepage"], "label": "sponsored"}]
    teen = UserContext(user_id="t", limit=5, age_bucket="<18", now=NOW)
    page = engine(pinned=pins).rerank(ranked(10), items, teen)
    assert [c.item_id for c in page][2] == "p" and "rule:pinned" in page[2].reasons
    assert "r" not in {c.item_id for c in page}
    other_surface = UserContext(user_id="t", limit=5, age_bucket="<18", surface="up_next", now=NOW)
    assert "p" not in {c.item_id for c in engine(pinned=pins).rerank(ranked(10), items, other_surface)}


def test_a_failing_rule_is_skipped_and_the_list_still_goes_out(caplog: pytest.LogCaptureFixture) -> None:
    items = catalog(5)
    items["i0"]["published_at"] = object()  # makes the freshness rule raise
    e = engine(freshness={"weight": 0.05})
    e._freshness = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    page = e.rerank(ranked(5), items, UserContext(user_id="u", limit=3, age_bucket="25-34", now=NOW))
    assert len(page) == 3 and "policy_rule_failed" in caplog.text


def test_region_restricted_items_need_a_known_region() -> None:
    items = catalog(2)
    items["i0"]["regions"] = ["ca"]
    unknown = UserContext(user_id="u", limit=5, age_bucket="25-34", now=NOW)
    canadian = UserContext(user_id="u", limit=5, age_bucket="25-34", region="ca", now=NOW)
    assert [c.item_id for c in engine().rerank(ranked(2), items, unknown)] == ["i1"]
    assert [c.item_id for c in engine().rerank(ranked(2), items, canadian)] == ["i0", "i1"]
