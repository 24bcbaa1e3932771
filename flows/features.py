"""Streaming user and item features, and trending lists.

In:  topics interactions (InteractionEvent), catalog.items (ItemRecord), catalog.users (UserProfile).
Out: Feast online store (Redis) views user_profile, user_short_term, user_long_term,
     item_metadata, item_stats; the compact JSON documents the API reads
     (RedisKeys.user_profile / user_features / item_features); trending ZSETs
     (RedisKeys.trending(region), None = global); bad records -> dead-letter topic.

    python -m bytewax.run "flows.features:build_flow()" -r .recsys/recovery/features -s 5 -b 30
    # scale out: one process per partition group, same command with -i 0/-i 1 and
    #   -a "host0:2101;host1:2101" (recovery dir on storage both see).

Steps (keyed state lives with its key's worker; every step is deterministic in
event time, so a replay from a snapshot rebuilds the same state):

1. ``dedup_events`` (by user): drops event_ids seen before (at-least-once log),
   fills the region from the user's profile.
2. ``item_state`` (by item): metadata from catalog.items, counts, windows, CTR,
   trending scores; tags each event with the item's category.
3. ``user_state`` (by user): recent items, consumed/skipped, decayed category
   affinity, session and lifetime counters.

Each key flushes at most once per ``features.flush_interval_s`` (a timer per
key): that is the micro-batch, and the sink writes every flushed key of a batch
in one Redis pipeline. While the flow reads behind the log (a backlog), a key
waits longer, so its events coalesce into fewer writes (FlushTimer). All writes
overwrite (never increment), so a restart that replays part of the log converges
on the same values.

Late events (several partitions interleave, and replay after a restart does so
differently): every feature is computed so the final value does not depend on
arrival order. Totals, CTR, decayed affinities and trending are order-free sums.
Windowed counts are as of the item's newest event; an event older than that by
more than the window plus ``features.lateness_s`` is left out of the windows
(it could never be inside one again) but still counts in the totals. A user's
session is the newest run of events with gaps under ``features.session_gap_s``
among the user's last 200 events, also independent of arrival order.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import math
import pickle
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from flows._common import (
    FlowIO,
    PartitionPerWorker,
    ReadLag,
    WriteLoad,
    dead_letter_sink,
    ensure_recovery_dir,
    kafka_source,
    read_records,
)
from schemas.catalog import ItemRecord, UserProfile
from schemas.events import InteractionEvent
from schemas.topics import Topics
from serving.config import FeatureSettings, Settings, load_settings

FLOW_NAME = "features"
CONSUMED_TYPES = frozenset({"view", "click", "watch", "like"})
# How much one interaction says about taste: a like more than a view; a skip against.
AFFINITY_WEIGHT = {"view": 1.0, "click": 2.0, "watch": 2.0, "like": 4.0, "skip": -2.0}
# How much one interaction makes an item "trending".
TRENDING_WEIGHT = {"view": 1.0, "click": 1.0, "watch": 2.0, "like": 3.0}
WINDOWS = (("1h", 3600, 300), ("24h", 86400, 3600), ("7d", 7 * 86400, 3600))  # name, span, bucket size
# Bucket series by size, each kept for its longest window: the 24h and 7d windows
# read the same hourly buckets, so an event updates two series, not three.
SERIES = tuple((size, max(span for _, span, sz in WINDOWS if sz == size))
               for size in sorted({size for _, _, size in WINDOWS}))
# Bucket size -> the WINDOWS entries that read that series.
WINDOWS_OF = {size: tuple(w for w, (_, _, sz) in enumerate(WINDOWS) if sz == size) for size, _ in SERIES}
STAT_INDEX = {"view": 0, "click": 1, "like": 2, "skip": 3}  # bucket slots; slot 4 = watch milliseconds
STAT_NAMES = ("views", "clicks", "likes", "skips", "watch_seconds")
# Watch time is bucketed in whole milliseconds: every bucket and window sum is then an
# integer, exact in any order of addition and removal (a float sum is not).
WATCH_MS = 1000
# Reading records this many seconds old, the flush interval is this share of it (capped):
# a backlog drains with fewer, bigger writes and its events wait at most half again as long.
CATCHUP_SHARE = 0.5
# Event times kept per user to find the current session (its length is capped by this).
SESSION_TIMES = 200


def _epoch(ts: datetime) -> float:
    return ts.timestamp()


def _iso(epoch_us: int) -> str:
    return datetime.fromtimestamp(epoch_us / 1e6, UTC).isoformat()


def _decay(value: float, dt: float, half_life_s: float) -> float:
    return value * math.exp(-math.log(2) * dt / half_life_s) if dt > 0 else value


# -- 1. de-duplication by event id ----------------------------------------------
def event_digest(event_id: str) -> int:
    """64 bits of BLAKE2b of an event id: the same in every process (unlike hash()).

    A user's last ``dedup_ids`` events are remembered by digest: 8 bytes each in
    memory and in every recovery snapshot, instead of a Python string (~75 bytes).
    Two of a user's remembered ids collide with a chance of about n^2 / 2^65.
    """
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


@dataclass
class DedupState:
    region: str | None = None
    # Digests of the user's most recent event ids, oldest first (pickled as raw bytes).
    digests: array[int] = field(default_factory=lambda: array("Q"))


class DedupLogic(StatefulBatchLogic[Any, Any, DedupState]):
    """(user) profiles and events -> profiles, and events seen for the first time with a region."""

    def __init__(self, cfg: FeatureSettings, state: DedupState | None) -> None:
        self.cfg = cfg
        self.state = _restore(state) or DedupState()
        self.seen = set(self.state.digests)

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        state = self.state
        for kind, record in values:
            if kind == "profile":
                state.region = record.region
                out.append(("profile", record))
                continue
            digest = event_digest(record.event_id)
            if digest in self.seen:
                continue
            self.seen.add(digest)
            state.digests.append(digest)
            if len(state.digests) > self.cfg.dedup_ids:
                self.seen.discard(state.digests.pop(0))
            out.append(("event", (record, record.region or state.region)))
        return out, self.RETAIN

    def snapshot(self) -> bytes:  # type: ignore[override]
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)


# -- 2. item state ----------------------------------------------------------------
@dataclass
class ItemState:
    item_id: str
    meta: dict[str, Any] = field(default_factory=lambda: {"status": "unknown"})
    counts: dict[str, int] = field(default_factory=dict)
    watch_seconds: float = 0.0
    watermark: float = 0.0
    # bucket size (s) -> bucket index -> [views, clicks, likes, skips, watch milliseconds]
    buckets: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    # Per WINDOWS entry: the sums of its buckets from window_starts[w] on, kept as
    # events arrive, so a flush reads 15 numbers instead of summing up to 170
    # buckets. When the watermark reaches window_next a window moves: the sums are
    # dropped (None) and recounted from the buckets at the next flush, at most once
    # per 5 minutes of event time in a live stream, once per flush in a replay.
    window_sums: list[list[int]] | None = None
    window_starts: list[int] | None = None
    window_next: float = 0.0
    # region ("" = global) -> ln(sum of w * exp(t / tau))
    trending: dict[str, float] = field(default_factory=dict)
    dirty_trending: set[str] = field(default_factory=set)
    newest_us: int = 0
    changes: int = 0
    dirty: bool = False
    # The metadata view is written only when the catalog record changes, stamped with
    # its updated_at (0 until one arrives): most flushes only move the stats.
    meta_us: int = 0
    meta_dirty: bool = False

    def bump(self, ts: float) -> None:
        self.newest_us = max(self.newest_us, int(ts * 1e6))
        self.changes += 1

    @property
    def version_us(self) -> int:
        # Feast keeps a row only if its timestamp is newer: newest time + number of
        # changes grows with every change and, unlike the order of arrival, is the
        # same whichever way partitions interleave (a replay ends on the same value).
        return self.newest_us + self.changes


def item_document(state: ItemState, cfg: FeatureSettings) -> dict[str, Any]:
    """The ItemFeatures document (schemas.features) for the item's current state."""
    c = state.counts
    windows: dict[str, dict[str, float]] = {}
    for (name, _, _), (views, clicks, likes, skips, watch_ms) in zip(WINDOWS, _window_sums(state), strict=True):
        windows[name] = {"views": float(views), "clicks": float(clicks), "likes": float(likes),
                         "skips": float(skips), "watch_seconds": watch_ms / WATCH_MS}
    clicks, impressions = c.get("click", 0), c.get("impression", 0)
    return {
        "item_id": state.item_id,
        **state.meta,
        "views": c.get("view", 0), "clicks": clicks, "watches": c.get("watch", 0), "likes": c.get("like", 0),
        "skips": c.get("skip", 0), "impressions": impressions, "watch_seconds": state.watch_seconds,
        "windows": windows,
        "ctr": (clicks + cfg.ctr_prior_alpha) / (impressions + cfg.ctr_prior_alpha + cfg.ctr_prior_beta),
        "trending_score": state.trending.get("", 0.0),
        "stats_as_of": state.watermark,
        "updated_at": _iso(state.version_us),
    }


def _window_start(watermark: float, span: int, size: int) -> int:
    """The first bucket index inside a window of ``span`` seconds that ends at ``watermark``."""
    return int((watermark - span) // size) + 1


def _window_sums(state: ItemState) -> list[list[int]]:
    if state.window_sums is None:
        _rebuild_windows(state)
    return state.window_sums  # type: ignore[return-value]


def _rebuild_windows(state: ItemState) -> None:
    """Window sums counted from the buckets, and the watermark at which a window next moves."""
    state.window_starts = [_window_start(state.watermark, span, size) for _, span, size in WINDOWS]
    state.window_sums = []
    for (_, _, size), start in zip(WINDOWS, state.window_starts, strict=True):
        inside = [bucket for index, bucket in state.buckets.get(size, {}).items() if index >= start]
        state.window_sums.append([sum(column) for column in zip(*inside, strict=True)] if inside else [0] * 5)
    # A window's start moves once (watermark - span) reaches its next bucket.
    state.window_next = min(start * size + span for start, (_, span, size) in zip(state.window_starts, WINDOWS,
                                                                                     strict=True))


def _meta_from_record(record: ItemRecord) -> dict[str, Any]:
    return {
        "category": record.category, "tags": list(record.tags), "language": record.language,
        "regions": list(record.regions) if record.regions is not None else None,
        "status": str(record.status), "published_at": record.published_at.timestamp() if record.published_at else None,
        "maturity_rating": str(record.maturity_rating) if record.maturity_rating else None,
    }


class ItemLogic(StatefulBatchLogic[Any, Any, ItemState]):
    """(item) metadata and events -> ("enriched", (event, category)) now, ("item", doc) on flush."""

    def __init__(self, cfg: FeatureSettings, state: ItemState | None) -> None:
        self.cfg = cfg
        self.state = _restore(state) or ItemState("", meta_dirty=True)
        self.tau = cfg.trending_half_life_h * 3600 / math.log(2)
        # (bucket size, how far behind the newest event buckets are kept, bucket count that triggers a trim)
        self.series = [(size, span + cfg.lateness_s, span // size + cfg.lateness_s // size + 2)
                       for size, span in SERIES]
        self.timer = FlushTimer(cfg, self.state.dirty)

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        s = self.state
        for kind, record in values:
            s.item_id = s.item_id or _item_key((kind, record))
            if kind == "meta":
                s.meta = _meta_from_record(record)
                s.bump(record.updated_at.timestamp())
                s.meta_us = round(record.updated_at.timestamp() * 1e6)
                s.meta_dirty = True
            else:
                event, region = record
                self._apply(event, region)
                out.append(("enriched", (event, s.meta.get("category"))))
            s.dirty = True
        if s.dirty:
            self.timer.start()
        return out, self.RETAIN

    def _apply(self, event: InteractionEvent, region: str | None) -> None:
        s = self.state
        kind = str(event.interaction_type)
        ts = event.timestamp.timestamp()
        counts = s.counts
        counts[kind] = counts.get(kind, 0) + 1
        seconds = event.interaction_value or 0.0 if kind == "watch" else 0.0
        s.watch_seconds += seconds
        s.newest_us = max(s.newest_us, int(ts * 1e6))
        s.changes += 1
        if ts > s.watermark:
            s.watermark = ts
            if ts >= s.window_next:
                s.window_sums = None  # a window moved: recounted when next read
        # Windows are as of the item's newest event. Buckets are kept for span +
        # lateness behind it; an event older than that could never be inside a window
        # again (the newest time only grows), so skipping it keeps the result the same
        # in any arrival order. Partitions replaying at different speeds after a
        # restart therefore end on the same windows.
        slot = STAT_INDEX.get(kind)
        watch_ms = round(seconds * WATCH_MS)
        if slot is not None or watch_ms:
            starts, sums = s.window_starts, s.window_sums
            for size, keep_s, limit in self.series:
                oldest = int((s.watermark - keep_s) // size)
                index = int(ts // size)
                buckets = s.buckets.get(size)
                if buckets is None:
                    buckets = s.buckets[size] = {}
                if index >= oldest:
                    bucket = buckets.get(index)
                    if bucket is None:
                        bucket = buckets[index] = [0] * 5
                    if slot is not None:
                        bucket[slot] += 1
                    bucket[4] += watch_ms
                    # Windows start after the oldest bucket kept: a bucket inside one is kept.
                    for w in WINDOWS_OF[size] if sums is not None else ():
                        if index >= starts[w]:  # type: ignore[index]
                            if slot is not None:
                                sums[w][slot] += 1
                            sums[w][4] += watch_ms
                # Buckets are mostly added in time order: the first one is usually the
                # oldest, so a watermark that moved on shows there (a recovery snapshot
                # pickles every bucket of the item; stale ones only cost).
                if len(buckets) > limit:
                    for stale in [i for i in buckets if i < oldest]:
                        del buckets[stale]
                else:
                    first = next(iter(buckets), None)
                    while first is not None and first < oldest:
                        del buckets[first]
                        first = next(iter(buckets), None)
        # Trending is a sum of w * exp(t / tau) (kept as a log): the same in any order.
        weight = TRENDING_WEIGHT.get(kind)
        if weight:
            term = math.log(weight) + ts / self.tau
            trending = s.trending
            for scope in ("", region) if region else ("",):
                old = trending.get(scope)
                trending[scope] = term if old is None else max(old, term) + math.log1p(math.exp(-abs(old - term)))
                s.dirty_trending.add(scope)

    def _flush(self) -> list[Any]:
        s = self.state
        if not s.dirty:
            return []
        out: list[Any] = [("item", item_document(s, self.cfg))]
        if s.meta_dirty:
            out.append(("item_meta", (s.item_id, s.meta, s.meta_us)))
            s.meta_dirty = False
        out.extend(("trending", (scope or None, (s.item_id, s.trending[scope])))
                   for scope in sorted(s.dirty_trending))
        s.dirty_trending.clear()
        s.dirty = False
        self.timer.next_tick = None
        return out

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        return (self._flush() if self.timer.due() else ()), self.RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        return self._flush(), self.RETAIN

    def notify_at(self) -> datetime | None:
        return self.timer.next_tick

    def snapshot(self) -> bytes:  # type: ignore[override]
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)


def write_interval(cfg: FeatureSettings) -> float:
    """The flush tick: ``flush_interval_s``, stretched to twice the time a write takes
    while writes are slow, never beyond ``flush_interval_max_s``."""
    return min(max(cfg.flush_interval_s, 2 * WriteLoad.seconds), max(cfg.flush_interval_max_s, cfg.flush_interval_s))


def flush_interval(cfg: FeatureSettings, tick: float | None = None) -> float:
    """How long a key that changes now waits before it writes.

    One tick (``tick``, else write_interval) when the flow is caught up. While it
    reads behind the log, a share of how old the records it reads are (ReadLag), up
    to ``flush_interval_catchup_s``: replaying a backlog, each key's events coalesce
    into one write per interval, which adds at most half again the lag they already have.
    """
    tick = write_interval(cfg) if tick is None else tick
    return max(tick, min(CATCHUP_SHARE * ReadLag.current(), cfg.flush_interval_catchup_s))


def _aligned(interval: float) -> float:
    """The next multiple of ``interval`` (epoch seconds): every key waiting for the same
    interval flushes in the same activation, one big batch for the sink."""
    return (math.floor(time.time() / interval) + 1) * interval


def flush_deadline_for(cfg: FeatureSettings, tick: float | None = None) -> datetime:
    """The next flush tick (of ``tick`` seconds, else write_interval)."""
    return datetime.fromtimestamp(_aligned(write_interval(cfg) if tick is None else tick), UTC)


class FlushTimer:
    """When a changed key writes: at the first tick after its flush interval.

    The key is woken at every tick (flush_deadline_for); while the flow catches up
    with a backlog it writes only once its longer interval has passed, so as soon
    as the flow has caught up it writes at the next tick instead of waiting out an
    interval chosen for a backlog that is gone. Not state: after a restore a
    changed key simply starts a new interval.
    """

    __slots__ = ("cfg", "next_tick", "write_at")

    def __init__(self, cfg: FeatureSettings, changed: bool) -> None:
        self.cfg = cfg
        self.next_tick: datetime | None = None
        self.write_at = 0.0
        if changed:
            self.start()

    def start(self) -> None:
        """The key changed: schedule its write unless one is scheduled."""
        if self.next_tick is None:
            tick = write_interval(self.cfg)
            self.next_tick = flush_deadline_for(self.cfg, tick)
            interval = flush_interval(self.cfg, tick)
            self.write_at = _aligned(interval) if interval > tick else 0.0

    def due(self) -> bool:
        """At a tick: write now (True), or wait for the next tick."""
        if self.write_at and time.time() < self.write_at:
            tick = write_interval(self.cfg)
            if flush_interval(self.cfg, tick) > tick:  # still behind the log
                self.next_tick = flush_deadline_for(self.cfg, tick)
                return False
        self.next_tick = None
        return True


def _restore(state: Any) -> Any:
    # Snapshots are pickled bytes: immutable, and far cheaper than copy.deepcopy.
    state = pickle.loads(state) if isinstance(state, bytes) else state
    if isinstance(state, DedupState) and "digests" not in vars(state):
        # A snapshot from before digests: the event ids themselves, in a deque.
        state.digests = array("Q", map(event_digest, vars(state).pop("ids", ())))
    if not isinstance(state, ItemState):
        return state
    old: dict[Any, Any] = state.buckets
    if "7d" in old:
        # Snapshots before the bucket series were shared: the 7d hourly buckets hold
        # the 24h window's too, "1h" is the 5-minute series.
        state.buckets = {300: old.get("1h", {}), 3600: old["7d"]}
    if "window_next" not in vars(state):
        # A snapshot from before window sums were kept (every ItemState made since has
        # the field in its __dict__): its buckets held watch time in float seconds.
        for series in state.buckets.values():
            for bucket in series.values():
                bucket[:] = [*map(int, bucket[:4]), round(bucket[4] * WATCH_MS)]
        state.window_sums = None
        state.window_next = 0.0
    return state


# -- 3. user state ----------------------------------------------------------------
@dataclass
class UserState:
    user_id: str
    # (ts, item_id, type), sorted by time ascending; the newest `recent_size` kept.
    recent: list[tuple[float, str, str]] = field(default_factory=list)
    consumed: dict[str, float] = field(default_factory=dict)  # item -> last time
    skipped: dict[str, float] = field(default_factory=dict)
    # The same entries as (-time, item), kept sorted (newest first) as they change, so a
    # flush slices instead of sorting hundreds of items again.
    consumed_order: list[tuple[float, str]] = field(default_factory=list)
    skipped_order: list[tuple[float, str]] = field(default_factory=list)
    affinity: dict[str, float] = field(default_factory=dict)
    long_term: dict[str, float] = field(default_factory=dict)
    as_of: float = 0.0
    total_events: int = 0
    total_likes: int = 0
    total_skips: int = 0
    total_watch_seconds: float = 0.0
    times: list[float] = field(default_factory=list)
    last_active: float = 0.0
    newest_us: int = 0
    changes: int = 0
    dirty: bool = False

    @property
    def version_us(self) -> int:
        return self.newest_us + self.changes

    def __getstate__(self) -> dict[str, Any]:
        # The sorted lists hold the same entries as the item -> time maps: a recovery
        # snapshot leaves the maps out (a third less to pickle) and restore rebuilds them.
        state = dict(self.__dict__)
        del state["consumed"], state["skipped"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for latest, order in (("consumed", "consumed_order"), ("skipped", "skipped_order")):
            if latest not in state:
                state[latest] = {item: -negative_ts for negative_ts, item in state[order]}
        self.__dict__.update(state)


def _remember(latest: dict[str, float], order: list[tuple[float, str]], item_id: str, ts: float, keep: int) -> None:
    """item -> its newest time, and the sorted (newest first) view of it; the newest ``keep`` survive.

    The result is the newest ``keep`` items whatever the arrival order: an item
    dropped here was older than ``keep`` others, and stays so.
    """
    old = latest.get(item_id)
    if old is not None:
        if ts <= old:
            return
        order.pop(bisect.bisect_left(order, (-old, item_id)))
    latest[item_id] = ts
    bisect.insort(order, (-ts, item_id))
    if len(order) > keep:
        for _, dropped in order[keep:]:
            del latest[dropped]
        del order[keep:]


def session(times: list[float], gap_s: float) -> tuple[int, float]:
    """(events, start) of the newest run of event times with no gap longer than ``gap_s``."""
    if not times:
        return 0, 0.0
    start = len(times) - 1
    while start > 0 and times[start] - times[start - 1] <= gap_s:
        start -= 1
    return len(times) - start, times[start]


def user_document(s: UserState, cfg: FeatureSettings) -> dict[str, Any]:
    """The UserFeatures document (schemas.features) for the user's current state."""
    session_events, session_start = session(s.times, cfg.session_gap_s)
    return {
        "user_id": s.user_id,
        "recent": [{"item_id": i, "interaction_type": t, "ts": ts} for ts, i, t in reversed(s.recent)],
        "consumed": [item for _, item in s.consumed_order[: cfg.consumed_size]],
        "skipped": [item for _, item in s.skipped_order[: cfg.skipped_size]],
        "category_affinity": dict(sorted(s.affinity.items(), key=lambda kv: (-kv[1], kv[0]))),
        "long_term_affinity": dict(sorted(s.long_term.items(), key=lambda kv: (-kv[1], kv[0]))),
        "affinity_as_of": s.as_of,
        "total_events": s.total_events, "total_likes": s.total_likes, "total_skips": s.total_skips,
        "total_watch_seconds": s.total_watch_seconds,
        "session_events": session_events, "session_start": session_start, "last_active": s.last_active,
        "updated_at": _iso(s.version_us),
    }


class UserLogic(StatefulBatchLogic[Any, Any, UserState]):
    """(user) (event, category) -> ("user", doc) on flush."""

    def __init__(self, cfg: FeatureSettings, state: UserState | None) -> None:
        self.cfg = cfg
        self.state = _restore(state) or UserState("")
        self.short_half = cfg.affinity_half_life_h * 3600
        self.long_half = cfg.long_term_half_life_h * 3600
        self.timer = FlushTimer(cfg, self.state.dirty)

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        for event, category in values:
            self.state.user_id = self.state.user_id or event.user_id
            self._apply(event, category)
        self.timer.start()
        return (), self.RETAIN

    def _apply(self, event: InteractionEvent, category: str | None) -> None:
        s, cfg = self.state, self.cfg
        kind = str(event.interaction_type)
        ts = _epoch(event.timestamp)
        s.dirty = True
        s.newest_us = max(s.newest_us, int(ts * 1e6))
        s.changes += 1
        s.total_events += 1
        s.total_likes += kind == "like"
        s.total_skips += kind == "skip"
        if kind == "watch":
            s.total_watch_seconds += event.interaction_value or 0.0
        if kind != "impression":
            # The newest SESSION_TIMES event times, sorted: the same set in any arrival
            # order (one user's events reach this step from many item workers).
            bisect.insort(s.times, ts)
            del s.times[: max(0, len(s.times) - SESSION_TIMES)]
        if kind != "impression":
            bisect.insort(s.recent, (ts, event.item_id, kind))
            del s.recent[: max(0, len(s.recent) - cfg.recent_size)]
        if kind in CONSUMED_TYPES:
            _remember(s.consumed, s.consumed_order, event.item_id, ts, cfg.consumed_size)
        elif kind == "skip":
            _remember(s.skipped, s.skipped_order, event.item_id, ts, cfg.skipped_size)
        # Decayed sums are kept as of the newest event time: adding a late event
        # is then the same sum in any order.
        if ts > s.as_of:
            factor_short = math.exp(-math.log(2) * (ts - s.as_of) / self.short_half)
            factor_long = math.exp(-math.log(2) * (ts - s.as_of) / self.long_half)
            for cat in s.affinity:
                s.affinity[cat] *= factor_short
            for cat in s.long_term:
                s.long_term[cat] *= factor_long
            s.as_of = ts
        weight = AFFINITY_WEIGHT.get(kind, 0.0)
        if category and weight:
            age = s.as_of - ts
            s.affinity[category] = s.affinity.get(category, 0.0) + _decay(weight, age, self.short_half)
            s.long_term[category] = s.long_term.get(category, 0.0) + _decay(weight, age, self.long_half)
        s.last_active = max(s.last_active, ts)

    def _flush(self) -> list[Any]:
        self.timer.next_tick = None
        if not self.state.dirty:
            return []
        self.state.dirty = False
        return [("user", user_document(self.state, self.cfg))]

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        return (self._flush() if self.timer.due() else ()), self.RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        return self._flush(), self.RETAIN

    def notify_at(self) -> datetime | None:
        return self.timer.next_tick

    def snapshot(self) -> bytes:  # type: ignore[override]
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)


# -- the dataflow ------------------------------------------------------------------
def default_io(settings: Settings, tail: bool = True) -> FlowIO:
    from flows.sinks import FeaturePartition

    topics = [settings.topic(t) for t in (Topics.INTERACTIONS, Topics.CATALOG_ITEMS, Topics.CATALOG_USERS)]
    return FlowIO(source=kafka_source(settings, topics, tail=tail), dead_letters=dead_letter_sink(settings),
                  outputs={"features": PartitionPerWorker(settings, FeaturePartition)})


def build_flow(settings: Settings | None = None, io: FlowIO | None = None, tail: bool = True) -> Dataflow:
    """The features dataflow; ``tail=False`` stops at the end of the log (replays, tests, benchmarks)."""
    settings = settings or load_settings()
    cfg = settings.features
    if io is None:
        ensure_recovery_dir(cfg.recovery_partitions)
        io = default_io(settings, tail=tail)
        # Keyed state is many small long-lived objects: frequent full collections
        # walk all of it for nothing. Collect young objects less often.
        gc.set_threshold(50_000, 50, 100)
    models = {
        settings.topic(Topics.INTERACTIONS): InteractionEvent,
        settings.topic(Topics.CATALOG_ITEMS): ItemRecord,
        settings.topic(Topics.CATALOG_USERS): UserProfile,
    }
    interactions, items = settings.topic(Topics.INTERACTIONS), settings.topic(Topics.CATALOG_ITEMS)

    flow = Dataflow(FLOW_NAME)
    records = read_records(flow, FLOW_NAME, settings, io, models)  # (topic, record)

    # Re-keying steps work on whole batches (one Python call per batch, not per
    # event and step): the per-event glue between the stateful steps is most of a
    # light event's cost otherwise.
    # A stream read by two steps is a branch in one call per batch (op.branch calls
    # Python once per item).
    item_meta = op.flat_map_batch("key_item_meta", records,
                                  lambda batch: [(r.item_id, ("meta", r)) for t, r in batch if t == items])
    user_side = op.flat_map_batch(
        "key_by_user", records,
        lambda batch: [(r.user_id, ("event" if t == interactions else "profile", r)) for t, r in batch if t != items])

    deduped = op.stateful_batch("dedup_events", user_side,  # type: ignore[arg-type]
                                lambda state: DedupLogic(cfg, state))  # (user, ("event", (event, region)) | ("profile", p))
    profiles = op.flat_map_batch("profile_update", deduped,
                                 lambda batch: [v for _, v in batch if v[0] == "profile"])
    events_by_item = op.flat_map_batch("key_by_item", deduped,
                                       lambda batch: [(v[1][0].item_id, v) for _, v in batch if v[0] == "event"])

    item_in = op.merge("item_inputs", item_meta, events_by_item)
    item_out = op.stateful_batch(
        "item_state", item_in, lambda state: ItemLogic(cfg, state)  # type: ignore[arg-type]
    )  # (item, ("enriched", (event, category)) | ("item", doc) | ("trending", (region, score)))
    enriched = op.flat_map_batch("key_enriched_by_user", item_out,  # (user, (event, category))
                                 lambda batch: [(v[1][0].user_id, v[1]) for _, v in batch if v[0] == "enriched"])
    user_out = op.stateful_batch(
        "user_state", enriched, lambda state: UserLogic(cfg, state),  # type: ignore[arg-type]
    )  # (user, ("user", doc))
    updates = op.merge("feature_updates", profiles,
                       op.flat_map_batch("drop_item_key", item_out,
                                         lambda batch: [v for _, v in batch if v[0] != "enriched"]),
                       op.flat_map_batch("drop_user_state_key", user_out, lambda batch: [kv[1] for kv in batch]))
    op.output("write_features", updates, io.outputs["features"])
    return flow



def _item_key(tagged: tuple[str, Any]) -> str:
    kind, record = tagged
    return record.item_id if kind == "meta" else record[0].item_id
