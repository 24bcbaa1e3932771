"""The in-process replay used for tuning drives the co-visitation flow's own steps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bench.pipeline_replay import CovisitReplay
from schemas.events import InteractionEvent
from serving.config import Settings


def event(user: str, item: str, minute: int, kind: str = "watch") -> InteractionEvent:
    return InteractionEvent(event_id=f"{user}-{item}-{minute}", user_id=user, item_id=item, interaction_type=kind,
                            timestamp=datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=minute))


def test_items_consumed_together_become_neighbours_and_skips_do_not() -> None:
    replay = CovisitReplay(Settings())
    for e in (event("u1", "a", 0), event("u1", "b", 1), event("u2", "a", 5), event("u2", "b", 6),
              event("u2", "c", 7, kind="skip"), event("u3", "a", 10), event("u3", "d", 60 * 48)):
        replay.apply(e)
    neighbours = dict(replay.top("a", 10))
    assert set(neighbours) == {"b"}  # c was skipped; d came two days later (outside the window)
    assert neighbours["b"] > 0
    assert replay.top("unknown", 10) == []
