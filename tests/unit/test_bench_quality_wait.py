"""bench/quality.py waits on what the flows write: its co-visitation prediction must match flows/covisit."""

from __future__ import annotations

import random
import shutil
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from bench.quality import LiveSystem
from flows.covisit import CountUsersLogic, PairLogic
from schemas.events import InteractionEvent
from serving.config import Settings


def events(n: int, seed: int) -> list[InteractionEvent]:
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    out, clock = [], 0.0
    for k in range(n):
        clock += rng.choice([10.0, 600.0, 40_000.0, 200_000.0])  # some inside the 1-day window, some not
        out.append(InteractionEvent(event_id=f"e{k}", user_id=f"u{rng.randrange(5)}", item_id=f"i{rng.randrange(30)}",
                                    interaction_type=rng.choice(["like", "watch", "view", "skip", "impression"]),
                                    timestamp=start + timedelta(seconds=clock)))
    return out


def flow_changed_lists(stream: list[InteractionEvent], settings: Settings) -> list[list[str]]:
    """Per chunk of 7 events: the items whose own neighbour list the covisit flow's steps update."""
    counts: dict[str, CountUsersLogic] = defaultdict(lambda: CountUsersLogic(None))
    pairs: dict[str, PairLogic] = defaultdict(lambda: PairLogic(settings.features, None))
    out = []
    for lo in range(0, len(stream), 7):
        changed = []
        for e in stream[lo:lo + 7]:
            if str(e.interaction_type) not in ("view", "click", "watch", "like"):
                continue
            counted, _ = counts[e.item_id].on_batch([(e.user_id, e.item_id, e.timestamp.timestamp())])
            emitted, _ = pairs[e.user_id].on_batch(list(counted))
            changed += [item for item, _ in emitted if item == e.item_id]
        out.append(list(dict.fromkeys(changed)))
    return out


def test_predicted_covisit_changes_match_the_flow_logic() -> None:
    settings = Settings()
    system = LiveSystem(settings)
    try:
        for seed in range(5):
            stream = events(300, seed)
            system.consumed.clear()
            system.recent_consumptions.clear()
            predicted = [system.expect(stream[lo:lo + 7]) for lo in range(0, len(stream), 7)]
            assert predicted == flow_changed_lists(stream, settings)
            assert any(predicted)
    finally:
        shutil.rmtree(system.tmp, ignore_errors=True)


def test_documents_expected_per_user_and_counted_item() -> None:
    system = LiveSystem(Settings())
    try:
        system.expect(events(50, 1))
        assert sum(system.expected.values()) == 50
        # Every type here is one an item document counts (views .. impressions).
        assert sum(system.item_expected.values()) == 50
    finally:
        shutil.rmtree(system.tmp, ignore_errors=True)
