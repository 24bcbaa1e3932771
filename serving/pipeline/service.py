"""The serving orchestrator: cache first, then the live pipeline, then fallbacks, within a budget.

In: a RecommendationRequest. Out: a RecommendationResponse with ``served_from``
saying how it was made. The order of fallbacks is configuration
(``recommend.fallbacks``), not code paths:

- ``cache``: the precomputed list for (user, surface), written by
  flows/recommendations.py or by an earlier live call; a stale entry is served
  at once while a background refresh recomputes it (stale-while-revalidate);
- ``live``: candidates -> light rank -> heavy rank -> policy re-rank, each stage
  under its own timeout and all of them under the total budget;
- ``trending_region`` / ``popular``: the trending lists in Redis, or, when
  Redis itself is down, the last snapshot of them kept in this process.

Every path passes the hard policy filters (status, region, maturity, consumed)
before anything is returned. Each served list is published to the impressions
topic with the request_id and positions.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from schemas.api import RecommendationRequest, RecommendationResponse
from schemas.events import ImpressionRecord
from schemas.topics import Topics
from serving.config import Settings
from serving.pipeline.policies import PolicyEngine
from serving.pipeline.ranking import light_rank
from serving.pipeline.types import Candidate, UserContext

log = logging.getLogger(__name__)


class RedisReads(Protocol):
    async def mget(self, keys: Any, *more: Any) -> Any: ...


class FeatureReader(Protocol):
    async def user_context(self, user_id: str) -> UserContext: ...
    async def item_features(self, item_ids: list[str]) -> dict[str, dict[str, Any]]: ...


class CandidateGenerator(Protocol):
    async def generate(self, ctx: UserContext, budget_s: float | None = None) -> list[Candidate]: ...
    def generate_sync(self, ctx: UserContext) -> list[Candidate]: ...


class HeavyRanker(Protocol):
    def rank(self, ctx: UserContext, candidates: list[Candidate], items: Mapping[str, Mapping[str, Any]]) -> list[Candidate]: ...


StageObserver = Callable[[str, float], None]


class StageTimeout(Exception):
    def __init__(self, stage: str) -> None:
        super().__init__(f"stage {stage} exceeded its budget")
        self.stage = stage


class Recommender:
    def __init__(self, settings: Settings, redis: aioredis.Redis, features: FeatureReader,
                 candidates: CandidateGenerator, policy: PolicyEngine, heavy: HeavyRanker | None = None,
                 publish: Callable[[str, str, bytes], None] | None = None,
                 observe: StageObserver | None = None, count: Callable[[str, str], None] | None = None,
                 reads: RedisReads | None = None) -> None:
        self.settings = settings
        self.cfg = settings.recommend
        self.keys = settings.keys
        self.redis = redis
        # The cached list is read on every request: through the multiplexed client when given.
        self.reads: RedisReads | aioredis.Redis = reads or redis
        self.features = features
        self.candidates = candidates
        self.policy = policy
        self.heavy = heavy
        self._publish = publish
        self._observe = observe or (lambda stage, seconds: None)
        self._count = count or (lambda name, label: None)
        self._refreshing: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        # Last known trending lists with their items, for when Redis is unreachable.
        self._snapshot: dict[str, list[str]] = {}
        self._snapshot_items: dict[str, dict[str, Any]] = {}

    # -- entry points ---------------------------------------------------------------
    async def recommend(self, request: RecommendationRequest, request_id: str) -> RecommendationResponse:
        """The answer as a validated response model."""
        shown, served_from, generated_at = await self._answer(request, request_id)
        return RecommendationResponse.model_validate({
            "user_id": request.user_id, "surface": request.surface, "generated_at": generated_at,
            "request_id": request_id, "served_from": served_from,
            "recommendations": [{"item_id": i, "score": s, "reasons": r} for i, s, r in shown],
        })

    async def recommend_json(self, request: RecommendationRequest, request_id: str) -> bytes:
        """The same answer as :meth:`recommend`, as the response's JSON bytes (the hot route sends these)."""
        shown, served_from, generated_at = await self._answer(request, request_id)
        return RecommendationResponse.wire_json(request.user_id, request.surface, shown, generated_at, request_id,
                                                served_from)

    async def _answer(self, request: RecommendationRequest, request_id: str
                      ) -> tuple[list[tuple[str, float, list[str]]], str, datetime]:
        """(item_id, score, reasons) rows of the page, where they came from and when; the impression is published."""
        started = time.perf_counter()
        page: list[Candidate] = []
        served_from = "empty"
        ctx: UserContext | None = None
        try:
            async with asyncio.timeout(self.cfg.total_budget_ms / 1000):
                for name in self.cfg.fallbacks:
                    try:
                        page, served_from, ctx = await self._try(name, request, ctx)
                    except Exception as exc:  # noqa: BLE001 (each fallback is best-effort)
                        self._count("fallback", f"{name}:{type(exc).__name__}")
                        log.warning("recommend_path_failed path=%s request_id=%s error=%r", name, request_id, exc)
                        continue
                    if page:
                        break
        except TimeoutError:
            self._count("fallback", "budget_exhausted")
            log.warning("recommend_budget_exhausted request_id=%s user_id=%s tried=%s", request_id,
                        request.user_id, served_from)
        if not page:
            # The budget ran out or every path failed: the in-process snapshot never waits on anything.
            page, served_from = self._from_snapshot(request, ctx), "fallback:snapshot"
        self._observe("total", time.perf_counter() - started)
        shown = [(c.item_id, round(float(c.score), 6), c.reasons) for c in page[: request.limit]]
        generated_at = datetime.now(UTC)
        self._log_impressions(request, request_id, shown, served_from, generated_at)
        return shown, served_from, generated_at

    async def compute(self, ctx: UserContext, background: bool = False) -> tuple[list[Candidate], dict[str, dict[str, Any]]]:
        """The live pipeline for one context (shared with the precompute flow).

        ``background`` (precompute flow, revalidation: nobody waits) runs every candidate
        source to completion and gives each stage the refresh budget instead of the request's.
        """
        if background:
            budget = self.cfg.refresh_budget_ms
            generate = asyncio.to_thread(self.candidates.generate_sync, ctx)
        else:
            budget = self.cfg.candidates_budget_ms
            # The generator merges what answered a little before the stage's own deadline, so a
            # slow source costs that source, not the whole live path.
            generate = self.candidates.generate(ctx, budget_s=max(0.0, budget / 1000 - 0.005))
        candidates = await self._stage("candidates", generate, budget)
        t0 = time.perf_counter()
        ids = [c.item_id for c in candidates]
        items = await self._stage("item_features", self.features.item_features(ids + self.policy.placement_ids),
                                  budget if background else self.cfg.features_budget_ms)
        t1 = time.perf_counter()
        shortlist = light_rank(candidates, ctx, items, self.cfg.source_weights, keep=self.cfg.light_keep)
        self._observe("light_rank", time.perf_counter() - t1)
        if self.heavy is not None and shortlist:
            t2 = time.perf_counter()
            try:
                shortlist = self.heavy.rank(ctx, shortlist, items)
            except Exception:  # noqa: BLE001 (the light order stands)
                log.exception("heavy_rank_failed user_id=%s", ctx.user_id)
            self._observe("heavy_rank", time.perf_counter() - t2)
        t3 = time.perf_counter()
        for candidate in shortlist:
            candidate.reasons = [f"source:{s}" for s in sorted(candidate.sources, key=lambda s: -candidate.sources[s])]
        exposure = await self._exposure(ctx.user_id)
        page = self.policy.rerank(shortlist, items, ctx, exposure=exposure)
        self._observe("rerank", time.perf_counter() - t3)
        self._observe("pipeline", time.perf_counter() - t0)
        return page, items

    async def refresh_cache(self, ctx: UserContext) -> list[Candidate]:
        """Compute and store the list for (user, surface); used by the flow and by revalidation."""
        page, _ = await self.compute(ctx, background=True)
        await self._write_cache(ctx, page)
        return page

    async def cached_ids(self, user_id: str, surface: str) -> tuple[list[str], datetime] | None:
        entry = await self._read_cache(user_id, surface)
        if entry is None:
            return None
        return [i[0] for i in entry["items"]], datetime.fromisoformat(entry["generated_at"])

    # -- paths ----------------------------------------------------------------------
    async def _try(self, name: str, request: RecommendationRequest, ctx: UserContext | None
                   ) -> tuple[list[Candidate], str, UserContext | None]:
        if name == "cache":
            page, state = await self._from_cache(request)
            return page, state, ctx
        ctx = ctx or await self._context(request)
        if name == "live":
            # Compute a whole cacheable list; the response takes its head.
            ctx.limit = max(request.limit, self.cfg.cache_size) if self._cacheable(request) else request.limit
            page, _ = await self.compute(ctx)
            if page and self._cacheable(request):
                self._spawn(self._write_cache(ctx, page))
            ctx.limit = request.limit
            return page[: request.limit], "live", ctx
        if name in ("trending_region", "popular"):
            region = ctx.region if name == "trending_region" else None
            if name == "trending_region" and not region:
                return [], name, ctx
            return await self._from_trending(ctx, region, name), f"fallback:{name}", ctx
        raise ValueError(f"unknown fallback {name!r} in recommend.fallbacks")

    async def _context(self, request: RecommendationRequest) -> UserContext:
        ctx = await self._stage("user_features", self.features.user_context(request.user_id), self.cfg.features_budget_ms)
        ctx.surface = request.surface.value
        ctx.limit = request.limit
        ctx.device = request.context.device.value if request.context.device else ctx.device
        ctx.region = request.context.region or ctx.region
        ctx.current_item_id = request.context.current_item_id or (
            ctx.recent_item_ids[0] if request.surface.value == "up_next" and ctx.recent else None)
        return ctx

    def _cacheable(self, request: RecommendationRequest) -> bool:
        # Lists that depend on a caller-given item or region are not the user's standing list.
        return request.surface.value in ("homepage", "up_next") and not request.context.current_item_id \
            and not request.context.region

    async def _from_cache(self, request: RecommendationRequest) -> tuple[list[Candidate], str]:
        if not self._cacheable(request):
            return [], "cache"
        t0 = time.perf_counter()
        entry = await self._read_cache(request.user_id, request.surface.value)
        if entry is None:
            self._count("cache", "miss")
            return [], "cache"
        ctx = UserContext(user_id=request.user_id, surface=request.surface.value, limit=request.limit,
                          region=entry.get("region"), age_bucket=entry.get("age_bucket"),
                          current_item_id=entry.get("current_item_id"))
        # The hard filters run on the cached order until the page is full (placements may
        # take slots): a list cached at cache_size costs ~limit checks and item reads, not
        # cache_size. Items are read for twice what the page needs, the rest only if the
        # filters dropped that many.
        need = request.limit + len(self.policy.placement_ids)
        rows = entry["items"]
        items = await self.features.item_features([i[0] for i in rows[: 2 * need]] + self.policy.placement_ids)
        page: list[Candidate] = []
        allowed = self.policy.checker(ctx)
        for n, (i, s, r) in enumerate(rows):
            if n == 2 * need:
                items.update(await self.features.item_features([i[0] for i in rows[n:]]))
            if allowed(i, items.get(i)) is None:
                page.append(Candidate(item_id=i, score=s, reasons=list(r)))
                if len(page) >= need:
                    break
        page = self.policy.place(page, items, ctx)
        self._observe("cache", time.perf_counter() - t0)
        if len(page) < request.limit:
            # Something in the list went away (deleted, blocked): recompute in the background.
            self._revalidate(request)
        now = time.time()
        stale = now > entry["fresh_until"] or entry["dirty"]
        # Marked stale by new events: within the grace the precompute flow recomputes it (see
        # recommend.dirty_grace_s); a list that only aged is revalidated here at once.
        if stale and not (entry["dirty"] and now - entry["dirty_at"] < self.cfg.dirty_grace_s):
            self._revalidate(request)
        self._count("cache", "stale" if stale else "hit")
        return page, "cache_stale" if stale else "cache"

    async def _from_trending(self, ctx: UserContext, region: str | None, name: str) -> list[Candidate]:
        key = self.keys.trending(region)
        ids = [m.decode() if isinstance(m, bytes) else m
               for m in await self.redis.zrevrange(key, 0, self.cfg.fallback_depth - 1)]
        items = await self.features.item_features(ids + self.policy.placement_ids)
        self._snapshot[key], self._snapshot_items = ids, {**self._snapshot_items, **items}
        n, allowed = len(ids), self.policy.checker(ctx)
        page = [Candidate(item_id=i, sources={name: 1 - k / max(n, 1)}, score=1 - k / max(n, 1), reasons=[f"source:{name}"])
                for k, i in enumerate(ids) if allowed(i, items.get(i)) is None]
        return self.policy.place(page[: ctx.limit], items, ctx)[: ctx.limit]

    def _from_snapshot(self, request: RecommendationRequest, ctx: UserContext | None) -> list[Candidate]:
        ctx = ctx or UserContext(user_id=request.user_id, surface=request.surface.value, limit=request.limit,
                                 region=request.context.region)
        ids = self._snapshot.get(self.keys.trending(ctx.region)) or self._snapshot.get(self.keys.trending(None)) or []
        allowed = self.policy.checker(ctx)
        page = [Candidate(item_id=i, score=0.0, reasons=["source:snapshot"]) for i in ids
                if allowed(i, self._snapshot_items.get(i)) is None][: request.limit]
        return self.policy.place(page, self._snapshot_items, ctx)[: request.limit]

    async def warm_snapshot(self) -> None:
        """Load the global trending list into the in-process snapshot (start-up and periodically)."""
        ctx = UserContext(user_id="-", limit=self.cfg.fallback_depth)
        await self._from_trending(ctx, None, "popular")

    # -- cache ----------------------------------------------------------------------
    async def _read_cache(self, user_id: str, surface: str) -> dict[str, Any] | None:
        raw, dirty = await self.reads.mget(self.keys.recommendations(user_id, surface),
                                           self.keys.recommendations_dirty(user_id))
        if not raw:
            return None
        entry: dict[str, Any] = orjson.loads(raw)
        # The user acted after this list was computed: serve it, but as stale (revalidated).
        entry["dirty_at"] = float(dirty) if dirty else 0.0
        entry["dirty"] = entry["dirty_at"] > entry.get("computed_at", 0.0)
        return entry

    def mark_dirty_soon(self, user_ids: set[str]) -> None:
        """``mark_dirty`` in the background (ingestion must not wait on it); failures are logged."""

        async def run() -> None:
            try:
                async with asyncio.timeout(1.0):
                    await self.mark_dirty(user_ids)
            except Exception as exc:  # noqa: BLE001 (the precompute flow still refreshes the lists)
                log.warning("mark_dirty_failed users=%d error=%r", len(user_ids), exc)

        self._spawn(run())

    async def mark_dirty(self, user_ids: set[str]) -> None:
        """Called when the user's events are accepted: their cached lists go stale at once."""
        now = str(time.time())
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.set(self.keys.recommendations_dirty(user_id), now, ex=int(self.cfg.cache_ttl_s))
            await pipe.execute()

    async def _write_cache(self, ctx: UserContext, page: list[Candidate], started_at: float | None = None) -> None:
        fresh = self.cfg.cache_fresh_cold_s if ctx.is_cold else self.cfg.cache_fresh_s
        fresh *= 1.0 - self.cfg.cache_fresh_jitter * random.random()
        started_at = started_at if started_at is not None else ctx.now.timestamp()
        entry = {
            "items": [[c.item_id, round(c.score, 6), c.reasons] for c in page],
            "generated_at": datetime.now(UTC).isoformat(),
            "fresh_until": time.time() + fresh,
            "computed_at": started_at,
            "region": ctx.region, "age_bucket": ctx.age_bucket, "current_item_id": ctx.current_item_id,
        }
        await self.redis.set(self.keys.recommendations(ctx.user_id, ctx.surface), orjson.dumps(entry),
                             ex=int(self.cfg.cache_ttl_s))

    def _revalidate(self, request: RecommendationRequest) -> None:
        key = f"{request.user_id}:{request.surface.value}"
        if key in self._refreshing:
            return
        self._refreshing.add(key)

        async def run() -> None:
            try:
                async with asyncio.timeout(self.cfg.refresh_budget_ms / 1000):
                    stripped = RecommendationRequest(user_id=request.user_id, surface=request.surface, limit=self.cfg.cache_size)
                    await self.refresh_cache(await self._context(stripped))
            except Exception as exc:  # noqa: BLE001 (the stale list keeps serving)
                log.warning("cache_refresh_failed user_id=%s error=%r", request.user_id, exc)
            finally:
                self._refreshing.discard(key)

        self._spawn(run())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- helpers --------------------------------------------------------------------
    async def _stage(self, stage: str, awaitable: Awaitable[Any], budget_ms: float) -> Any:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(budget_ms / 1000):
                return await awaitable
        except TimeoutError as exc:
            raise StageTimeout(stage) from exc
        finally:
            self._observe(stage, time.perf_counter() - t0)

    async def _exposure(self, user_id: str) -> dict[str, int]:
        day = datetime.now(UTC).strftime("%Y%m%d")
        try:
            raw = await self.redis.hgetall(self.keys.exposure(user_id, day))
        except Exception:  # noqa: BLE001 (caps are best-effort)
            return {}
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}

    def _log_impressions(self, request: RecommendationRequest, request_id: str,
                         shown: list[tuple[str, float, list[str]]], served_from: str, generated_at: datetime) -> None:
        if self._publish is None or not shown:
            return
        # Built from values that were validated on the way in (request) or made here: no re-validation.
        record = ImpressionRecord.wire_json(
            request_id=request_id, user_id=request.user_id, surface=request.surface,
            item_ids=[i for i, _, _ in shown], scores=[s for _, s, _ in shown], served_from=served_from,
            device=request.context.device, region=request.context.region, timestamp=generated_at,
        )
        self._publish(self.settings.topic(Topics.IMPRESSIONS), request.user_id, record)
