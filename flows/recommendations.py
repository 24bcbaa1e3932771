"""Precomputed recommendation lists, kept fresh by user activity, and daily exposure counts.

In:  topics interactions (InteractionEvent) and impressions (ImpressionRecord).
Out: Redis lists for (user, homepage) and (user, up_next) at RedisKeys.recommendations,
     computed by the same pipeline code the API runs live (serving/pipeline);
     per-user daily exposure counts (RedisKeys.exposure) for the exposure caps;
     bad records -> dead-letter topic.

    python -m bytewax.run "flows.recommendations:build_flow()" -r .recsys/recovery/recommendations -s 5 -b 30

A user's events are collected for ``recommend.debounce_s`` after the first one
(bytewax ``collect``), then both lists are recomputed once: a burst of clicks
costs one recompute, and a click changes the next homepage within ~1-2 s. The
events of the burst are merged into the user's context before computing, so the
new list never waits on the features flow having written them.
Exposure counts are idempotent per request_id (replays do not count twice).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import StatelessSinkPartition

from flows._common import (
    FlowIO,
    PartitionPerWorker,
    dead_letter_sink,
    ensure_recovery_dir,
    kafka_source,
    read_records,
    redis_client,
)
from schemas.events import ImpressionRecord, InteractionEvent
from schemas.topics import Topics
from serving.config import Settings, load_settings
from serving.pipeline.types import UserContext

log = logging.getLogger(__name__)

FLOW_NAME = "recommendations"
SURFACES = ("homepage", "up_next")
CONSUMED = frozenset({"view", "click", "watch", "like"})

# SADD the request id; only a first sighting increments (replay-safe).
_COUNT_EXPOSURE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  for i = 2, #ARGV do redis.call('HINCRBY', KEYS[1], ARGV[i], 1) end
  redis.call('EXPIRE', KEYS[1], 172800)
  redis.call('EXPIRE', KEYS[2], 172800)
end
return 0
"""


def merge_events(ctx: UserContext, events: list[InteractionEvent]) -> UserContext:
    """Fold a burst of fresh events into the context (newest first), ahead of the features flow."""
    seen = {item for item, _, _ in ctx.recent}
    for event in sorted(events, key=lambda e: e.timestamp):
        kind = event.interaction_type.value
        if kind == "impression":
            continue
        if event.item_id not in seen:
            ctx.recent.insert(0, (event.item_id, kind, event.timestamp.timestamp()))
            seen.add(event.item_id)
        if kind in CONSUMED:
            ctx.consumed.add(event.item_id)
        elif kind == "skip":
            ctx.skipped.add(event.item_id)
    return ctx


class _RecomputePartition(StatelessSinkPartition[Any]):
    """(user_id, [events]) -> recompute and cache the user's lists."""

    def __init__(self, settings: Settings) -> None:
        from serving.pipeline.factory import build_recommender

        self.loop = asyncio.new_event_loop()
        self.settings = settings
        self.recommender, self._close = self.loop.run_until_complete(build_recommender(settings))

    def write_batch(self, items: list[tuple[str, list[InteractionEvent]]]) -> None:
        self.loop.run_until_complete(self._recompute_all(items))

    async def _recompute_all(self, items: list[tuple[str, list[InteractionEvent]]]) -> None:
        results = await asyncio.gather(*(self._recompute(u, ev) for u, ev in items), return_exceptions=True)
        for (user_id, _), result in zip(items, results, strict=True):
            if isinstance(result, Exception):
                # Best-effort: the API computes the list live on a cache miss, so one
                # failed recompute (a slow Milvus, say) must not stop the flow.
                log.warning("recompute_failed user_id=%s error=%r", user_id, result)

    async def _recompute(self, user_id: str, events: list[InteractionEvent]) -> None:
        base = await self.recommender.features.user_context(user_id)
        for surface in SURFACES:
            ctx = merge_events(_copy(base), events)
            ctx.surface, ctx.limit = surface, self.settings.recommend.cache_size
            if surface == "up_next":
                if not ctx.recent:
                    continue
                ctx.current_item_id = ctx.recent_item_ids[0]
            await self.recommender.refresh_cache(ctx)

    def close(self) -> None:
        self.loop.run_until_complete(self._close())
        self.loop.close()


def _copy(ctx: UserContext) -> UserContext:
    return UserContext(**{**{f: getattr(ctx, f) for f in ctx.__slots__},  # type: ignore[attr-defined]
                          "recent": list(ctx.recent), "consumed": set(ctx.consumed), "skipped": set(ctx.skipped)})


class _ExposurePartition(StatelessSinkPartition[Any]):
    """ImpressionRecord -> daily exposure counts, once per request_id."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = redis_client(settings)
        self.script = self.client.register_script(_COUNT_EXPOSURE)

    def write_batch(self, items: list[ImpressionRecord]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for record in items:
            day = record.timestamp.astimezone(UTC).strftime("%Y%m%d")
            keys = [self.settings.keys.exposure(record.user_id, day), self.settings.keys.exposure_seen(day)]
            self.script(keys=keys, args=[record.request_id, *record.item_ids], client=pipe)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


def default_io(settings: Settings, tail: bool = True) -> FlowIO:
    topics = [settings.topic(Topics.INTERACTIONS), settings.topic(Topics.IMPRESSIONS)]
    return FlowIO(source=kafka_source(settings, topics, tail=tail), dead_letters=dead_letter_sink(settings),
                  outputs={"recompute": PartitionPerWorker(settings, _RecomputePartition), "exposure": PartitionPerWorker(settings, _ExposurePartition)})


def build_flow(settings: Settings | None = None, io: FlowIO | None = None, tail: bool = True) -> Dataflow:
    settings = settings or load_settings()
    if io is None:
        ensure_recovery_dir(settings.features.recovery_partitions)
        io = default_io(settings, tail=tail)
    interactions = settings.topic(Topics.INTERACTIONS)
    models = {interactions: InteractionEvent, settings.topic(Topics.IMPRESSIONS): ImpressionRecord}

    flow = Dataflow(FLOW_NAME)
    records = read_records(flow, FLOW_NAME, settings, io, models)  # (topic, record)
    split = op.branch("split_impressions", records, lambda tr: tr[0] == interactions)
    events = op.map("event", split.trues, lambda tr: tr[1])  # InteractionEvent
    impressions = op.map("impression", split.falses, lambda tr: tr[1])  # ImpressionRecord
    op.output("count_exposure", impressions, io.outputs["exposure"])

    # Recompute only for events that are recent: replaying years of history must not
    # recompute every user thousands of times (their lists are built on first request).
    horizon = timedelta(seconds=settings.recommend.recompute_horizon_s)
    fresh = op.filter("only_recent_events", events, lambda e: datetime.now(UTC) - e.timestamp <= horizon)
    keyed = op.key_on("key_by_user", fresh, lambda e: e.user_id)
    bursts = op.collect("debounce_user", keyed, timeout=timedelta(seconds=settings.recommend.debounce_s),
                        max_size=1000)  # (user_id, [event])
    op.output("recompute_lists", bursts, io.outputs["recompute"])
    return flow
