"""The precompute flow's pure parts: folding a burst of fresh events into the user's context."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flows.recommendations import merge_events
from schemas.events import InteractionEvent
from serving.pipeline.types import UserContext

T0 = datetime(2024, 6, 1, tzinfo=UTC)


def event(item: str, kind: str, seconds: int) -> InteractionEvent:
    return InteractionEvent(user_id="u", item_id=item, interaction_type=kind, timestamp=T0 + timedelta(seconds=seconds))


def test_burst_is_folded_in_newest_first_with_consumed_and_skipped() -> None:
    ctx = UserContext(user_id="u", recent=[("old", "like", 1.0)], consumed={"old"})
    merged = merge_events(ctx, [event("b", "like", 20), event("a", "click", 10), event("c", "skip", 30),
                                event("d", "impression", 40)])
    assert merged.recent_item_ids == ["c", "b", "a", "old"]
    assert merged.consumed == {"old", "a", "b"}
    assert merged.skipped == {"c"}


def test_items_already_in_recent_are_not_duplicated() -> None:
    ctx = UserContext(user_id="u", recent=[("a", "click", 1.0)])
    assert merge_events(ctx, [event("a", "like", 5)]).recent_item_ids == ["a"]
