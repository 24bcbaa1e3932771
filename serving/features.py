"""Online features for the serving hot path, and Feast reads for the debug endpoints.

In:  the compact JSON documents flows/features writes (RedisKeys.user_profile,
     user_features, item_features), the trending and co-visitation ZSETs.
Out: ``UserContext`` for the pipeline, item feature dicts, trending lists.

Why not Feast on the hot path: ``get_online_features`` for 500 items measured
30 ms p50 / 220 ms p99 (DESIGN.md). Here one request costs one MGET for the
user and one MGET for the candidates (~1 ms for 200 items; both on the
multiplexed connection of serving/multiplexed_redis.py), and item documents
are cached in-process. A catalog change (status, regions, rating: what the hard
filters read) evicts the item within ``features.reader_changes_poll_s``: the
feature flow appends its id to the catalog-changes stream after writing the new
document, and the reader reads the stream's new entries at most that often. The
TTL (``features.reader_cache_ttl_s``) bounds how stale statistics may be, and
anything a change lost to the stream's trim would have left. Feast stays the
store of record: the same values are in its online store, read by
``FeastReader`` below.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from serving.config import Settings
from serving.multiplexed_redis import MultiplexedRedis
from serving.pipeline.types import UserContext

MGET_CHUNK = 500
log = logging.getLogger(__name__)


def trending_popularity(score: float, now: float, half_life_h: float) -> float:
    """A trending ZSET score (ln sum w*exp(t/tau)) -> decayed popularity at ``now`` (epoch s)."""
    tau = half_life_h * 3600 / math.log(2)
    return math.exp(score - now / tau)


def context_from_documents(user_id: str, profile: dict[str, Any], features: dict[str, Any]) -> UserContext:
    """A UserContext from the profile and UserFeatures documents (also used by offline replays)."""
    return UserContext(
        user_id=user_id,
        region=profile.get("region"),
        language=profile.get("language"),
        age_bucket=profile.get("age_bucket"),
        recent=[(r["item_id"], r["interaction_type"], r["ts"]) for r in features.get("recent", ())],
        consumed=set(features.get("consumed", ())),
        skipped=set(features.get("skipped", ())),
        category_affinity=dict(features.get("category_affinity", {})),
        preferred_categories=list((profile.get("preferences") or {}).get("categories", ())),
    )


def hot_view(doc: dict[str, Any]) -> dict[str, Any]:
    """An item document as the hot path keeps it: top-level values, lists as tuples, nested objects left out.

    What ranking and the policies read is all top level (status, regions,
    category, counters). The rest is for the cycle collector: a dict holding
    only strings, numbers and tuples of them stops being tracked after one full
    collection, so cached documents no longer make every full collection walk
    them. With parsed documents as they come (lists, the nested ``windows``),
    full collections on the live path at 100k items took 8-180 ms of CPU
    each and set its p99 (GC callbacks in process; p99 95-99 -> 36-42 ms
    through uvicorn at one connection).
    """
    return {k: tuple(v) if type(v) is list else v for k, v in doc.items() if type(v) is not dict}


class OnlineFeatures:
    """Fast reads of user and item features; one instance per process, shared by requests."""

    def __init__(self, settings: Settings, client: aioredis.Redis, reads: MultiplexedRedis | None = None) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.client = client
        # The reads of every request (user context, item documents): the multiplexed client when given.
        self.reads: aioredis.Redis | MultiplexedRedis = reads or client
        self.cache_ttl_s = settings.features.reader_cache_ttl_s
        self._items: dict[str, dict[str, Any] | None] = {}
        self._expiry: dict[str, float] = {}
        # Position in the catalog-changes stream (None: not read yet, nothing is cached until it is).
        self._changes_from: bytes | None = None
        self._changes_due = 0.0
        self._changes_seen = 0  # batches of evictions applied: a fetch that overlapped one is not cached
        self._changes_failed_at = 0.0

    async def user_context(self, user_id: str, *, surface: str = "homepage", limit: int = 10,
                           device: str | None = None, region: str | None = None,
                           current_item_id: str | None = None) -> UserContext:
        """The user's profile and streaming state in one round trip (a cold user gets an empty context)."""
        profile_raw, features_raw = await self.reads.mget(self.keys.user_profile(user_id),
                                                           self.keys.user_features(user_id))
        profile = orjson.loads(profile_raw) if profile_raw else {}
        features = orjson.loads(features_raw) if features_raw else {}
        ctx = context_from_documents(user_id, profile, features)
        ctx.surface, ctx.limit, ctx.device, ctx.current_item_id = surface, limit, device, current_item_id
        ctx.region = region or ctx.region
        return ctx

    async def item_features(self, item_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """item_id -> ItemFeatures document (schemas.features) as :func:`hot_view` keeps it; items never seen are left out."""
        now = time.monotonic()
        if now >= self._changes_due and self.cache_ttl_s > 0:
            await self._follow_catalog_changes(now)
        found: dict[str, dict[str, Any]] = {}
        missing: list[str] = []
        docs, expiry = self._items, self._expiry
        for item_id in dict.fromkeys(item_ids):
            if expiry.get(item_id, 0.0) > now:
                if (doc := docs[item_id]) is not None:
                    found[item_id] = doc
            else:
                missing.append(item_id)
        if missing:
            expires = now + self.cache_ttl_s
            for start in range(0, len(missing), MGET_CHUNK):
                chunk = missing[start:start + MGET_CHUNK]
                seen = self._changes_seen
                raws = await self.reads.mget([self.keys.item_features(i) for i in chunk])
                # A read sent before an eviction may hold the old document: served, not kept.
                keep = self.cache_ttl_s > 0 and self._changes_from is not None and seen == self._changes_seen
                for item_id, raw in zip(chunk, raws, strict=True):
                    doc = hot_view(orjson.loads(raw)) if raw else None
                    if keep:
                        docs[item_id], expiry[item_id] = doc, expires
                    if doc is not None:
                        found[item_id] = doc
            if len(docs) > 200_000:  # bound memory: drop expired entries (in place: the app froze these dicts)
                for item_id in [k for k, e in expiry.items() if e <= now]:
                    del docs[item_id], expiry[item_id]
        return found

    async def _follow_catalog_changes(self, now: float, count: int = 1000) -> None:
        """Evict the items the catalog-changes stream names since the last read (one request at a time)."""
        self._changes_due = now + self.settings.features.reader_changes_poll_s
        key = self.keys.catalog_changes()
        try:
            if self._changes_from is None:
                last = await self.client.xrevrange(key, count=1)
                self._changes_from = last[0][0] if last else b"0-0"
                return
            while True:
                reply = await self.client.xread({key: self._changes_from}, count=count)
                entries = reply[0][1] if reply else []
                for _, fields in entries:
                    self._expiry.pop((fields.get(b"item_id") or b"").decode(), None)
                if entries:
                    self._changes_from = entries[-1][0]
                    self._changes_seen += 1
                if len(entries) < count:
                    return
        except (RedisError, OSError) as exc:
            # Kept position: the next read catches up. Until then the TTL bounds staleness.
            if now - self._changes_failed_at > 60:
                self._changes_failed_at = now
                log.warning("catalog_changes_read_failed error=%s", exc)

    async def trending(self, region: str | None = None, k: int = 100) -> list[tuple[str, float]]:
        """Top ``k`` trending items (global when region is None), best first."""
        rows = await self.client.zrevrange(self.keys.trending(region), 0, k - 1, withscores=True)
        return [(member.decode(), score) for member, score in rows]

    async def neighbours(self, item_id: str, k: int = 100) -> list[tuple[str, float]]:
        """Co-visitation neighbours of an item, closest first."""
        rows = await self.client.zrevrange(self.keys.item_neighbours(item_id), 0, k - 1, withscores=True)
        return [(member.decode(), score) for member, score in rows]

    async def serving_documents(self, entity: str, entity_id: str) -> dict[str, Any] | None:
        """The raw documents the hot path reads (for the debug endpoints)."""
        if entity == "user":
            raws = await self.client.mget(self.keys.user_profile(entity_id), self.keys.user_features(entity_id))
            docs = {"profile": raws[0], "features": raws[1]}
        else:
            docs = {"features": await self.client.get(self.keys.item_features(entity_id))}
        if all(v is None for v in docs.values()):
            return None
        return {name: orjson.loads(raw) if raw else None for name, raw in docs.items()}


class FeastReader:
    """Feast ``get_online_features`` for operators; built on first use (importing Feast takes seconds)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Any = None
        self._lock = asyncio.Lock()

    async def _get_store(self) -> Any:
        async with self._lock:
            if self._store is None:
                from feature_repo.store import feature_store

                self._store = await asyncio.to_thread(feature_store, self.settings)
        return self._store

    async def read(self, entity: str, entity_id: str) -> dict[str, dict[str, dict[str, Any]]]:
        """view -> feature -> {value, updated_at}; features never written have value None."""
        from feature_repo import feature_definitions as defs

        store = await self._get_store()
        views: Sequence[Any] = defs.USER_VIEWS if entity == "user" else defs.ITEM_VIEWS
        refs = [f"{view.name}:{f.name}" for view in views for f in view.features]
        rows = [{f"{entity}_id": entity_id}]

        def read() -> dict[str, list[Any]]:
            response = store.get_online_features(features=refs, entity_rows=rows, full_feature_names=True)
            return response.to_dict(include_event_timestamps=True)  # type: ignore[no-any-return]

        values = await asyncio.to_thread(read)
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for view in views:
            for f in view.features:
                name = f"{view.name}__{f.name}"
                value = values.get(name, [None])[0]
                ts = values.get(f"{name}__ts", [None])[0]
                updated = datetime.fromtimestamp(ts, UTC) if value is not None and ts else None
                out.setdefault(view.name, {})[f.name] = {"value": value, "updated_at": updated}
        return out
