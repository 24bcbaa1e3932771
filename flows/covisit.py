"""Item-to-item co-visitation: items consumed by the same user close in time.

In:  topic interactions (InteractionEvent; view/click/watch/like count as consumed).
Out: Redis ZSET RedisKeys.item_neighbours(item): member = neighbour item id,
     score = co-visits / sqrt(users(item) * users(neighbour)) (cosine of the
     two items' user sets, counted within the window), top ``covisit_top_k``.

    python -m bytewax.run "flows.covisit:build_flow()" -r .recsys/recovery/covisit -s 5 -b 30

A flow of its own (not a step of flows/features) because each consumption fans
out into up to 2 x ``covisit_max_recent`` pair messages: as a separate process
it runs on another core and scales (-i/-a) apart from the features flow, whose
freshness it would otherwise slow down.

Steps:
1. ``count_users`` (by item): the first consumption of an item by a user is
   counted (users(item)); repeats and at-least-once duplicates are dropped.
2. ``pair_recent`` (by user): pairs the item with the user's previous items
   consumed within ``covisit_window_s`` (at most ``covisit_max_recent``).
3. ``neighbours`` (by item): co-visit counts per neighbour; flushes the top k
   at most once per ``features.flush_interval_s`` (DEL + ZADD in one MULTI: an
   overwrite, so readers never see a half list and replays are harmless).

Malformed records are not dead-lettered here: flows/features reads the same
topic and dead-letters them once; this flow skips them.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import StatelessSinkPartition

from flows._common import (
    FlowIO,
    PartitionPerWorker,
    dead_letter_sink,
    ensure_recovery_dir,
    kafka_source,
    redis_client,
    to_message,
)
from schemas.events import InteractionEvent
from schemas.topics import Topics
from serving.config import FeatureSettings, Settings, load_settings

FLOW_NAME = "covisit"
CONSUMED_TYPES = frozenset({"view", "click", "watch", "like"})
# Users remembered per item to drop repeats; beyond it every consumption counts.
MAX_USERS_PER_ITEM = 20_000


def parse_consumption(message: Any) -> tuple[str, str, float] | None:
    """A raw record -> (user_id, item_id, epoch s) for a consumption, else None."""
    try:
        event = InteractionEvent.model_validate_json(to_message(message).value or b"")
    except ValueError:
        return None
    if str(event.interaction_type) not in CONSUMED_TYPES:
        return None
    return event.user_id, event.item_id, event.timestamp.timestamp()


# -- 1. users per item ------------------------------------------------------------
@dataclass
class ItemUsers:
    users: set[str] = field(default_factory=set)
    count: int = 0


class CountUsersLogic(StatefulBatchLogic[Any, Any, ItemUsers]):
    """(item) (user, item, ts) -> (user, item, ts, users(item)) on a user's first consumption."""

    def __init__(self, state: ItemUsers | None) -> None:
        self.state = state or ItemUsers()

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        out = []
        s = self.state
        for user_id, item_id, ts in values:
            if user_id in s.users:
                continue
            if len(s.users) < MAX_USERS_PER_ITEM:
                s.users.add(user_id)
            s.count += 1
            out.append((user_id, item_id, ts, s.count))
        return out, self.RETAIN

    def snapshot(self) -> ItemUsers:
        return ItemUsers(set(self.state.users), self.state.count)


# -- 2. pairs per user --------------------------------------------------------------
class PairLogic(StatefulBatchLogic[Any, Any, list[tuple[float, str, int]]]):
    """(user) consumptions -> (item, (neighbour, users(item), users(neighbour))) both ways."""

    def __init__(self, cfg: FeatureSettings, state: list[tuple[float, str, int]] | None) -> None:
        self.cfg = cfg
        self.recent = state or []  # (ts, item, users(item)), sorted by time

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        window, k = self.cfg.covisit_window_s, self.cfg.covisit_max_recent
        for _, item_id, ts, n_item in values:
            # The k nearest earlier-or-later items within the window: the same pairs
            # whichever order the user's items arrive in from the item workers.
            lo = bisect.bisect_left(self.recent, (ts - window,))
            hi = bisect.bisect_right(self.recent, (ts + window, "\uffff"))
            near = sorted(self.recent[lo:hi], key=lambda r: (abs(r[0] - ts), r[1]))[:k]
            for _, other, n_other in near:
                if other != item_id:
                    out.append((item_id, (other, n_item, n_other)))
                    out.append((other, (item_id, n_other, n_item)))
            bisect.insort(self.recent, (ts, item_id, n_item))
            # Keep only what can still pair: recent enough and a bounded count.
            del self.recent[: max(0, len(self.recent) - 4 * k)]
        return out, self.RETAIN

    def snapshot(self) -> list[tuple[float, str, int]]:
        return list(self.recent)


# -- 3. neighbours per item ---------------------------------------------------------
@dataclass
class Neighbours:
    item_id: str = ""
    users: int = 0
    # neighbour -> [co-visits, users(neighbour)]
    weights: dict[str, list[int]] = field(default_factory=dict)
    dirty: bool = False


def top_neighbours(s: Neighbours, k: int) -> list[tuple[str, float]]:
    """Best k (neighbour, cosine score), best first; ties by id for a stable order."""
    def score(item: tuple[str, list[int]]) -> float:
        covisits, users = item[1]
        return covisits / math.sqrt(max(s.users, 1) * max(users, 1))

    best = heapq.nsmallest(k, s.weights.items(), key=lambda kv: (-score(kv), kv[0]))
    return [(other, score((other, w))) for other, w in best]


class NeighbourLogic(StatefulBatchLogic[Any, Any, Neighbours]):
    def __init__(self, cfg: FeatureSettings, state: Neighbours | None) -> None:
        self.cfg = cfg
        self.state = state or Neighbours()
        self.next_flush: datetime | None = datetime.now(UTC) if self.state.dirty else None

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        s = self.state
        for item_id, (other, n_self, n_other) in values:
            s.item_id = item_id
            s.users = max(s.users, n_self)
            entry = s.weights.setdefault(other, [0, 0])
            entry[0] += 1
            entry[1] = max(entry[1], n_other)
        if len(s.weights) > self.cfg.covisit_keep * 2:  # prune in bulk, keep the best
            s.weights = dict(
                (other, s.weights[other]) for other, _ in top_neighbours(s, self.cfg.covisit_keep)
            )
        s.dirty = True
        if self.next_flush is None:
            self.next_flush = datetime.now(UTC) + timedelta(seconds=self.cfg.flush_interval_s)
        return (), self.RETAIN

    def _flush(self) -> tuple[list[Any], bool]:
        self.next_flush = None
        if not self.state.dirty:
            return [], self.RETAIN
        self.state.dirty = False
        return [(self.state.item_id, top_neighbours(self.state, self.cfg.covisit_top_k))], self.RETAIN

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        return self._flush()

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        return self._flush()

    def notify_at(self) -> datetime | None:
        return self.next_flush

    def snapshot(self) -> Neighbours:
        s = self.state
        return Neighbours(s.item_id, s.users, {k: list(v) for k, v in s.weights.items()}, s.dirty)


class _NeighbourPartition(StatelessSinkPartition[Any]):
    """(item, [(neighbour, score)]) -> the item's neighbour ZSET, replaced whole."""

    def __init__(self, settings: Settings) -> None:
        self.keys = settings.keys
        self.client = redis_client(settings)

    def write_batch(self, items: list[Any]) -> None:
        latest = dict(items)  # item -> newest top list in this batch
        pipe = self.client.pipeline(transaction=True)
        for item_id, top in latest.items():
            key = self.keys.item_neighbours(item_id)
            pipe.delete(key)
            if top:
                pipe.zadd(key, dict(top))
        pipe.execute()

    def close(self) -> None:
        self.client.close()


def default_io(settings: Settings, tail: bool = True) -> FlowIO:
    return FlowIO(source=kafka_source(settings, [settings.topic(Topics.INTERACTIONS)], tail=tail),
                  dead_letters=dead_letter_sink(settings), outputs={"neighbours": PartitionPerWorker(settings, _NeighbourPartition)})


def build_flow(settings: Settings | None = None, io: FlowIO | None = None, tail: bool = True) -> Dataflow:
    """The co-visitation dataflow; ``tail=False`` stops at the end of the log."""
    settings = settings or load_settings()
    cfg = settings.features
    if io is None:
        ensure_recovery_dir(cfg.recovery_partitions)
        io = default_io(settings, tail=tail)
    flow = Dataflow(FLOW_NAME)
    raw = op.input("read_interactions", flow, io.source)
    consumed = op.filter_map("parse_consumption", raw, parse_consumption)  # (user, item, ts)
    counted = op.stateful_batch("count_users", op.key_on("key_by_item", consumed, lambda c: c[1]),
                                CountUsersLogic)  # (item, (user, item, ts, users(item)))
    pairs = op.stateful_batch(
        "pair_recent", op.key_on("key_by_user", op.map("drop_item_key", counted, lambda kv: kv[1]), lambda c: c[0]),
        lambda state: PairLogic(cfg, state),
    )  # (user, (item, (neighbour, users(item), users(neighbour))))
    keyed_pairs = op.key_on("key_pair_by_item", op.map("drop_user_key", pairs, lambda kv: kv[1]), lambda p: p[0])
    neighbours = op.stateful_batch("neighbours", keyed_pairs, lambda state: NeighbourLogic(cfg, state))
    op.output("write_neighbours", op.map("drop_neighbour_key", neighbours, lambda kv: kv[1]),
              io.outputs["neighbours"])
    return flow
