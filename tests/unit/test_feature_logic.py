"""The features, co-visitation and archive state logic, driven directly (no broker, no Redis)."""

from __future__ import annotations

import pickle
import random
from collections import deque

import pytest

from flows._common import ReadLag, WriteLoad
from flows.covisit import Neighbours, top_neighbours
from flows.features import (
    DedupLogic,
    DedupState,
    ItemLogic,
    ItemState,
    UserLogic,
    UserState,
    _restore,
    flush_deadline_for,
    flush_interval,
    item_document,
    session,
    user_document,
)
from schemas.catalog import ItemRecord, UserProfile
from schemas.events import InteractionEvent
from serving.config import FeatureSettings
from serving.features import context_from_documents, trending_popularity

CFG = FeatureSettings()
T0 = 1_714_564_800


def event(i: int, user: str = "u1", item: str = "m1", kind: str = "view", at: float | None = None,
          value: float | None = None) -> InteractionEvent:
    return InteractionEvent(event_id=f"e{i}", user_id=user, item_id=item, interaction_type=kind,
                            interaction_value=value, timestamp=T0 + (i * 60 if at is None else at))


def replay_user(events: list[tuple[InteractionEvent, str | None]]) -> dict:
    logic = UserLogic(CFG, None)
    for pair in events:
        logic.on_batch([pair])
    return user_document(logic.state, CFG)


def replay_item(events: list[InteractionEvent], category: str = "Drama") -> dict:
    logic = ItemLogic(CFG, None)
    logic.on_batch([("meta", ItemRecord(item_id="m1", category=category, updated_at="2024-01-01T00:00:00Z"))])
    for e in events:
        logic.on_batch([("event", (e, "ca"))])
    return item_document(logic.state, CFG)


def test_user_snapshots_leave_out_the_maps_the_sorted_lists_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    logic = UserLogic(CFG, None)
    kinds = ["view", "skip", "like"]
    for i in range(400):
        logic.on_batch([(event(i, item=f"m{i % 150}", kind=kinds[i % 3]), "Drama")])
    snapshot = logic.snapshot()
    with monkeypatch.context() as patch:
        patch.delattr(UserState, "__getstate__")
        old_layout = logic.snapshot()  # what snapshots held before: the maps too
    assert len(snapshot) < 0.8 * len(old_layout)
    for restored in (UserLogic(CFG, snapshot).state, UserLogic(CFG, old_layout).state):
        assert restored.consumed == logic.state.consumed and restored.skipped == logic.state.skipped
        assert user_document(restored, CFG) == user_document(logic.state, CFG)


def test_user_features_do_not_depend_on_arrival_order() -> None:
    kinds = ["view", "click", "like", "watch", "skip"]
    events = [(event(i, item=f"m{i % 17}", kind=kinds[i % 5], value=30.0 if i % 5 == 3 else None),
               f"cat{i % 4}") for i in range(300)]
    shuffled = events[:]
    random.Random(3).shuffle(shuffled)
    a, b = replay_user(events), replay_user(shuffled)
    for name in ("recent", "consumed", "skipped", "total_events", "session_events", "session_start", "updated_at"):
        assert a[name] == b[name], name
    assert list(a["category_affinity"]) == list(b["category_affinity"])
    for cat, score in a["category_affinity"].items():
        assert b["category_affinity"][cat] == pytest.approx(score, rel=1e-12)


def test_likes_outweigh_views_in_affinity_and_old_taste_decays() -> None:
    events = [(event(0, item="c1", at=0), "Comedy"), (event(1, item="c2", at=60), "Comedy"),
              (event(2, item="c3", at=120), "Comedy")]
    events += [(event(3 + i, item=f"d{i}", kind="like", at=180 + i), "Drama") for i in range(3)]
    doc = replay_user(events)
    assert list(doc["category_affinity"])[0] == "Drama"
    # Three weeks later, one view of Horror outranks the old (72 h half-life) likes.
    doc = replay_user(events + [(event(9, item="h1", at=21 * 86400), "Horror")])
    assert list(doc["category_affinity"])[0] == "Horror"
    assert list(doc["long_term_affinity"])[0] == "Drama"  # the 90-day view still remembers


def test_recent_is_newest_first_and_capped() -> None:
    doc = replay_user([(event(i, item=f"m{i}"), None) for i in range(80)])
    assert len(doc["recent"]) == CFG.recent_size
    assert doc["recent"][0]["item_id"] == "m79" and doc["recent"][-1]["item_id"] == "m30"


def test_session_is_the_newest_run_without_long_gaps() -> None:
    assert session([], 1800) == (0, 0.0)
    assert session([0, 100, 5000, 5100, 5200], 1800) == (3, 5000)
    assert session([0, 100, 200], 1800) == (3, 0)


def test_item_windows_totals_and_ctr_prior() -> None:
    events = [event(i, kind="click", at=i * 600) for i in range(10)]  # one click per 10 min for 100 min
    events += [event(100 + i, kind="impression", at=6000) for i in range(20)]
    events += [event(200, kind="watch", at=6000, value=90.0)]
    events += [event(300, kind="click", at=6000 - 10 * 86400)]  # ten days before: totals only
    doc = replay_item(events)
    assert doc["clicks"] == 11 and doc["impressions"] == 20 and doc["watch_seconds"] == 90.0
    assert doc["windows"]["1h"]["clicks"] == 5  # clicks at 3000..5400 s: the last hour as of t=6000 s
    assert doc["windows"]["24h"]["clicks"] == 10 and doc["windows"]["7d"]["clicks"] == 10
    assert doc["windows"]["1h"]["watch_seconds"] == 90.0
    assert doc["ctr"] == pytest.approx((11 + 1) / (20 + 20))
    assert doc["category"] == "Drama"


def test_item_stats_do_not_depend_on_arrival_order() -> None:
    events = [event(i, kind=["view", "click", "like"][i % 3], at=(i * 7919) % 20000) for i in range(200)]
    shuffled = events[:]
    random.Random(5).shuffle(shuffled)
    a, b = replay_item(events), replay_item(shuffled)
    assert a["windows"] == b["windows"] and a["updated_at"] == b["updated_at"]
    assert a["trending_score"] == pytest.approx(b["trending_score"], rel=1e-12)


def test_window_sums_kept_as_events_arrive_equal_a_recount_of_the_buckets() -> None:
    # Late events, events older than the window, watermark jumps of hours and of weeks.
    rng = random.Random(11)
    times = [rng.choice([rng.uniform(0, 3 * 86400), rng.uniform(20 * 86400, 21 * 86400)]) for _ in range(600)]
    logic = ItemLogic(CFG, None)
    for i, at in enumerate(times):
        kind = rng.choice(["view", "click", "like", "skip", "watch", "impression"])
        logic.on_batch([("event", (event(i, kind=kind, at=at, value=rng.uniform(1, 600) if kind == "watch" else None),
                                   "ca"))])
        if i % 50 == 0:
            kept = pickle.loads(pickle.dumps(logic.state))
            recount = pickle.loads(pickle.dumps(logic.state))
            recount.window_sums = None
            assert item_document(recount, CFG)["windows"] == item_document(kept, CFG)["windows"]
            assert kept.window_sums == recount.window_sums
        if i % 7 == 0:
            item_document(logic.state, CFG)  # a flush: sums counted again if a window moved
    windows = item_document(logic.state, CFG)["windows"]
    assert windows["7d"]["views"] > 0 and windows["1h"]["views"] <= windows["24h"]["views"] <= windows["7d"]["views"]


def test_watch_time_windows_do_not_depend_on_arrival_order() -> None:
    events = [event(i, kind="watch", at=(i * 7919) % 20000, value=0.1 + i / 7) for i in range(200)]
    shuffled = events[:]
    random.Random(6).shuffle(shuffled)
    assert replay_item(events)["windows"] == replay_item(shuffled)["windows"]


def test_trending_score_ranks_recent_popularity() -> None:
    old = replay_item([event(i, at=0) for i in range(10)])
    new = replay_item([event(i, at=2 * 86400) for i in range(3)])
    assert new["trending_score"] > old["trending_score"]  # 3 views two days later beat 10 (24 h half-life)
    now = T0 + 2 * 86400
    assert trending_popularity(new["trending_score"], now, CFG.trending_half_life_h) == pytest.approx(3.0)
    assert trending_popularity(old["trending_score"], now, CFG.trending_half_life_h) == pytest.approx(2.5)


def test_dedup_drops_repeated_event_ids_and_fills_region() -> None:
    logic = DedupLogic(CFG, None)
    out, _ = logic.on_batch([("profile", UserProfile(user_id="u1", region="ca")), ("event", event(1)),
                             ("event", event(1)), ("event", event(2))])
    events = [v for kind, v in out if kind == "event"]
    assert [e.event_id for e, _ in events] == ["e1", "e2"] and all(region == "ca" for _, region in events)
    restored = DedupLogic(CFG, logic.snapshot())  # the snapshot is what recovery restores
    assert list(restored.on_batch([("event", event(2))])[0]) == []


def test_dedup_remembers_the_newest_ids_and_restores_snapshots_that_held_the_ids() -> None:
    cfg = CFG.model_copy(update={"dedup_ids": 3})
    logic = DedupLogic(cfg, None)
    logic.on_batch([("event", event(i)) for i in range(1, 6)])  # remembers e3, e4, e5
    assert [e.event_id for _, (e, _) in logic.on_batch([("event", event(i)) for i in (1, 4, 5)])[0]] == ["e1"]
    assert len(pickle.dumps(logic.state)) < 200  # digests pickle as raw bytes
    old = DedupState(region="ca")  # the layout before digests: a deque of the ids
    del old.__dict__["digests"]
    old.ids = deque(["e1", "e2"])
    restored = DedupLogic(CFG, pickle.dumps(old))
    out, _ = restored.on_batch([("event", event(1)), ("event", event(3))])
    assert [(e.event_id, region) for _, (e, region) in out] == [("e3", "ca")]


def test_item_metadata_is_written_when_the_catalog_record_changes_only() -> None:
    logic = ItemLogic(CFG, None)
    logic.on_batch([("event", (event(1), None))])
    first = dict(logic.on_notify()[0])
    assert first["item_meta"] == ("m1", {"status": "unknown"}, 0)  # an item seen before its record
    logic.on_batch([("event", (event(2), None))])
    assert "item_meta" not in dict(logic.on_notify()[0])  # stats moved, metadata did not
    record = ItemRecord(item_id="m1", category="Drama", updated_at="2024-01-01T00:00:00Z")
    logic.on_batch([("meta", record), ("event", (event(3), None))])
    item_id, meta, stamp = dict(logic.on_notify()[0])["item_meta"]
    assert meta["category"] == "Drama" and stamp == 1_704_067_200_000_000  # stamped with the record's time


def test_snapshots_from_before_shared_hourly_buckets_restore_the_same_windows() -> None:
    events = [event(i, kind=["view", "click", "like", "skip", "watch"][i % 5], at=i * 917,
                    value=12.345 if i % 5 == 4 else None) for i in range(400)]
    logic = ItemLogic(CFG, None)
    for e in events:
        logic.on_batch([("event", (e, "ca"))])
    old = pickle.loads(pickle.dumps(logic.state))
    # The layout older snapshots have: one bucket series per window name (24h a subset of 7d),
    # watch time in float seconds, no window sums.
    for name in ("window_sums", "window_starts", "window_next"):
        del old.__dict__[name]
    for series in old.buckets.values():
        for bucket in series.values():
            bucket[:] = [*map(float, bucket[:4]), bucket[4] / 1000]
    hourly = old.buckets[3600]
    old.buckets = {"1h": old.buckets[300], "7d": hourly,
                   "24h": {i: b for i, b in hourly.items() if i * 3600 > old.watermark - 86400 - 7200}}
    restored = _restore(pickle.dumps(old))
    assert isinstance(restored, ItemState)
    assert item_document(restored, CFG)["windows"] == item_document(logic.state, CFG)["windows"]


def test_flush_interval_stretches_with_slow_writes_but_stays_capped() -> None:
    import time

    saved = WriteLoad.seconds
    try:
        WriteLoad.seconds = 0.0
        assert flush_deadline_for(CFG).timestamp() - time.time() <= CFG.flush_interval_s + 1e-3
        WriteLoad.seconds = 30.0  # a pathologically slow store must not delay features by a minute
        assert flush_deadline_for(CFG).timestamp() - time.time() <= CFG.flush_interval_max_s + 1e-3
    finally:
        WriteLoad.seconds = saved


def test_flush_interval_grows_with_how_far_behind_the_log_the_flow_reads() -> None:
    import time

    saved, WriteLoad.seconds = WriteLoad.seconds, 0.0
    try:
        ReadLag.note("t", 0, time.time() * 1000 - 20)  # caught up: records 20 ms old
        assert flush_interval(CFG) == CFG.flush_interval_s
        ReadLag.note("t", 1, time.time() * 1000 - 1000)  # one partition 1 s behind: half of it
        assert flush_interval(CFG) == pytest.approx(0.5, abs=0.01)
        ReadLag.note("t", 1, time.time() * 1000 - 3_600_000)  # replaying an hour of log: capped
        assert flush_interval(CFG) == CFG.flush_interval_catchup_s
        ReadLag.note_empty("t", 1)  # one empty poll: maybe just a fetch in flight
        assert flush_interval(CFG) == CFG.flush_interval_catchup_s
        time.sleep(ReadLag.IDLE_S)  # nothing new for a while: caught up
        assert flush_interval(CFG) == CFG.flush_interval_s
    finally:
        ReadLag.forget("t", 0)
        ReadLag.forget("t", 1)
        WriteLoad.seconds = saved


def test_a_key_waits_out_a_backlog_interval_but_writes_at_the_next_tick_once_caught_up() -> None:
    import time

    saved, WriteLoad.seconds = WriteLoad.seconds, 0.0
    try:
        ReadLag.note("t", 0, time.time() * 1000 - 3_600_000)
        logic = UserLogic(CFG, None)
        logic.on_batch([(event(1), "Drama")])
        # Woken at every tick (not after the 2 s backlog interval) ...
        assert logic.notify_at().timestamp() - time.time() <= CFG.flush_interval_s + 1e-3
        out, _ = logic.on_notify()
        assert list(out) == [] and logic.state.dirty  # ... but still behind: waits
        ReadLag.note("t", 0, time.time() * 1000 - 20)
        out, _ = logic.on_notify()
        assert [kind for kind, _ in out] == ["user"] and logic.notify_at() is None
    finally:
        ReadLag.forget("t", 0)
        WriteLoad.seconds = saved


def test_snapshots_are_immutable_bytes() -> None:
    logic = UserLogic(CFG, None)
    logic.on_batch([(event(1), "Drama")])
    snap = logic.snapshot()
    logic.on_batch([(event(2), "Drama")])
    assert pickle.loads(snap).total_events == 1


def test_co_visitation_scores_are_cosine_and_best_first() -> None:
    state = Neighbours(item_id="a", users=4, weights={"b": [4, 4], "c": [1, 1], "d": [1, 16]})
    top = top_neighbours(state, 2)
    assert [n for n, _ in top] == ["b", "c"]
    assert top[0][1] == pytest.approx(1.0) and top[1][1] == pytest.approx(0.5)


def test_context_from_documents() -> None:
    doc = replay_user([(event(1, item="m1", kind="like"), "Drama"), (event(2, item="m2", kind="skip"), "Comedy")])
    ctx = context_from_documents("u1", {"region": "ca", "preferences": {"categories": ["Drama"]}}, doc)
    assert ctx.recent_item_ids == ["m2", "m1"] and ctx.consumed == {"m1"} and ctx.skipped == {"m2"}
    assert ctx.region == "ca" and ctx.preferred_categories == ["Drama"]
    assert ctx.category_affinity["Drama"] > 0 > ctx.category_affinity["Comedy"]
