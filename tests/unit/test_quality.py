"""Live quality arithmetic: CTR by surface, coverage, list diversity, exposure Gini, windowing."""

from __future__ import annotations

import pytest

from schemas.catalog import ItemRecord, ItemStatus
from schemas.events import ImpressionRecord, InteractionEvent
from serving.quality import QualityWindow, gini, list_diversity


def impression(surface: str, items: list[str], n: int = 0) -> ImpressionRecord:
    return ImpressionRecord(request_id=f"r{n}", user_id="u", surface=surface, item_ids=items, served_from="live")


def click(surface: str | None, kind: str = "click") -> InteractionEvent:
    return InteractionEvent(user_id="u", item_id="a", interaction_type=kind, surface=surface)


def test_gini_is_zero_when_even_and_near_one_when_concentrated() -> None:
    assert gini([5, 5, 5, 5]) == 0.0
    assert gini([0, 0, 0, 100]) == pytest.approx(0.75)
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0


def test_list_diversity_counts_pairs_of_different_categories() -> None:
    assert list_diversity(["a", "a", "a"]) == 0.0
    assert list_diversity(["a", "b", "c"]) == 1.0
    assert list_diversity(["a", "a", "b"]) == pytest.approx(2 / 3)


def test_window_figures() -> None:
    window = QualityWindow(window_s=600, bucket_s=60)
    for item, category in (("a", "drama"), ("b", "drama"), ("c", "comedy"), ("d", "comedy")):
        window.observe_item(ItemRecord(item_id=item, category=category))
    window.observe_item(ItemRecord(item_id="gone", status=ItemStatus.deleted))
    window.observe_impression(impression("homepage", ["a", "b", "c"]), now=1000)
    window.observe_impression(impression("homepage", ["a", "b"], 1), now=1010)
    window.observe_impression(impression("related", ["a", "c"], 2), now=1020)
    for event in (click("homepage"), click("homepage", "watch"), click("homepage", "skip"),
                  click(None), click("related", "like")):
        window.observe_interaction(event, now=1030)
    figures = window.figures(now=1040)
    assert figures["ctr"] == {"homepage": 2 / 5, "related": 1 / 2}      # skip and no-surface don't count
    assert figures["coverage"] == 3 / 4                                   # d never shown; deleted not counted
    assert figures["diversity"]["homepage"] == pytest.approx((2 / 3 + 0) / 2)
    assert figures["diversity"]["related"] == 1.0
    assert 0 < figures["gini"] < 1


def test_old_buckets_leave_the_window() -> None:
    window = QualityWindow(window_s=120, bucket_s=60)
    window.observe_impression(impression("homepage", ["a"]), now=0)
    window.observe_interaction(click("homepage"), now=0)
    assert window.figures(now=30)["ctr"] == {"homepage": 1.0}
    window.observe_impression(impression("homepage", ["a", "b"], 1), now=200)
    assert window.figures(now=200)["ctr"] == {"homepage": 0.0}
