"""Candidate generation: a UserContext in, up to ~1,000 merged candidates out.

Plain code shared by the API (``await generate(ctx)``, per request, under a
~150 ms budget) and the precompute flow (``generate_sync(ctx)``). Sources,
in merge order, each with its quota from ``settings.retrieval.quotas``:

- ``ann``: the user tower's vector (recent history + profile, at request time) -> ANN;
- ``item2item``: ANN around the current item (or the last few the user touched);
- ``covisit``: co-visitation neighbours of those items (Redis ZSETs);
- ``content``: ANN within the user's top categories (category affinity);
- ``trending_region`` / ``trending``: popularity in the user's region and globally;
- ``fresh``: recently published or cold-start items near the user's vector (exploration).

Index calls: ``ann`` and ``item2item`` share one (``near``), ``content`` and
``fresh`` another (``filtered``); the embedded Milvus charges mostly per call.

A user with no history still gets the profile-only vector (region, language,
age, device), trending, regional trending and fresh items. Every source
degrades on its own: an error or a timeout (Milvus down, Redis slow) is
logged and that source is skipped; the others still answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infra.milvus import SearchFilter
from model.two_tower import NEGATIVE_TYPES, TwoTowerModel
from serving.candidates.backends import ItemIndex, Signals
from serving.config import RetrievalSettings
from serving.pipeline.types import Candidate, UserContext

log = logging.getLogger(__name__)

SourceResult = list[tuple[str, float]]
# Rank fusion constant: a candidate's merged score is sum(1 / (RRF_K + rank)) over its sources.
RRF_K = 60
# Sources that only read Redis signals: they run in their own thread pool, so searches that
# overran their budget on a loaded index can never queue them out of theirs.
SIGNAL_SOURCES = frozenset({"covisit", "trending_region", "trending"})
# At most this many seed vectors are cached (64 floats each: ~3 MB); past it the cache starts over.
SEED_VECTOR_CACHE_ITEMS = 10_000


class Once:
    """A value computed once, by the first thread that asks; the others wait for it (or its exception)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._value: Any = None

    def get(self, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if not self._done:
                try:
                    self._value = compute()
                except BaseException as exc:  # every asker fails with it
                    self._value = exc
                self._done = True
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value


@dataclass
class Request:
    """Per-request state the sources share (the user vector is computed once)."""

    ctx: UserContext
    user_vector: np.ndarray | None
    seeds: list[str]
    exclude: frozenset[str]
    region: str | None
    # Deadline of each index call (generate(): the source timeout, so a search that missed its
    # budget frees its thread instead of holding it for milvus.timeout_s); None: backend default.
    timeout_s: float | None = None
    # Source -> k for this request (ann's and item2item's shared call sizes itself from them).
    quotas: dict[str, int] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    # Index calls two sources share (CandidateGenerator.near: ann and item2item; .filtered:
    # content and fresh): made by whichever of the two asks first, in its thread.
    near: Once = field(default_factory=Once)
    filtered: Once = field(default_factory=Once)


class CandidateGenerator:
    """Runs the configured sources and merges them; one instance per process, thread-safe."""

    def __init__(self, config: RetrievalSettings, model: Callable[[], TwoTowerModel | None], index: ItemIndex,
                 signals: Signals, executor: ThreadPoolExecutor | None = None) -> None:
        self.config = config
        self.model = model
        self.index = index
        self.signals = signals
        self.executor = executor or ThreadPoolExecutor(max_workers=16, thread_name_prefix="candidates")
        self.signals_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="candidates-signals")
        # item id -> (expiry on the monotonic clock, vector), for the model version below.
        self._vectors: dict[str, tuple[float, np.ndarray]] = {}
        self._vectors_version: str | None = None
        self.sources: dict[str, Callable[[Request, int], SourceResult]] = {
            "ann": self.ann,
            "item2item": self.item2item,
            "covisit": self.covisit,
            "content": self.content,
            "trending_region": self.trending_region,
            "trending": self.trending,
            "fresh": self.fresh,
        }

    # -- request preparation ----------------------------------------------------
    def prepare(self, ctx: UserContext, quotas: dict[str, int] | None = None) -> Request:
        """One request's shared state; ``quotas`` (default: the configured ones) size each source.

        Call a source as ``sources[name](request, request.quotas[name])``: ann and item2item
        size their shared index call from ``request.quotas``.
        """
        positives = [i for i, kind, _ in ctx.recent if kind not in NEGATIVE_TYPES]
        seeds = [ctx.current_item_id] if ctx.current_item_id else positives[: self.config.seed_items]
        exclude = frozenset(ctx.consumed) | frozenset(ctx.skipped) | frozenset(filter(None, [ctx.current_item_id]))
        model = self.model()
        vector = model.encode_user(ctx) if model is not None else None
        region = ctx.region if self.config.filter_by_region else None
        return Request(ctx=ctx, user_vector=vector, seeds=seeds, exclude=exclude, region=region,
                       quotas=self._quotas(quotas))

    def _overfetch(self, request: Request, k: int) -> int:
        # Already-consumed items are filtered after the search; fetch enough to still fill k.
        return k + min(len(request.exclude), 2 * k)

    # -- sources ------------------------------------------------------------------
    def near(self, request: Request) -> tuple[SourceResult | None, list[SourceResult]]:
        """ANN around the user vector (for ``ann``) and around each seed (for ``item2item``), in ONE index call.

        Both search the same index under the same filter, and Milvus' cost is mostly per call
        (the region filter over every row, the request itself), not per query vector: at 100k
        items, 5.3 ms of server CPU for the user vector alone, 4.1 ms for three seeds, 7.0 ms
        for all four together. Each query asks for the larger of the two sources' sizes.
        Returns (the user vector's hits or None, one hit list per seed vector).
        """
        return request.near.get(lambda: self._near(request))  # type: ignore[no-any-return]

    def _near(self, request: Request) -> tuple[SourceResult | None, list[SourceResult]]:
        user_vector = request.user_vector
        k_user = request.quotas.get("ann", 0) if user_vector is not None else 0
        k_seed = request.quotas.get("item2item", 0)
        seeds = list(self.seed_vectors(request).values()) if k_seed and request.seeds else []
        queries = ([user_vector] if user_vector is not None and k_user else []) + seeds
        if not queries:
            return None, []
        limit = max(self._overfetch(request, k_user) if k_user else 0,
                    self._overfetch(request, max(1, k_seed // len(seeds))) if seeds else 0)
        hits = [self._filter(request, rows, limit)
                for rows in self.index.search_many(queries, limit, SearchFilter(region=request.region), request.timeout_s)]
        return (hits[0] if k_user else None), hits[1 if k_user else 0:]

    def ann(self, request: Request, k: int) -> SourceResult:
        if request.user_vector is None:
            return []
        user_hits, _ = self.near(request)
        return (user_hits or [])[:k]

    def seed_vectors(self, request: Request) -> dict[str, np.ndarray]:
        """The seeds' vectors (in seed order), from the in-process cache where fresh, else the index."""
        ttl = self.config.seed_vector_cache_s
        if ttl <= 0:
            return self.index.vectors(request.seeds, request.timeout_s)
        model = self.model()
        version = getattr(model, "version", None)
        if version != self._vectors_version:  # a new model: new vectors behind the serving alias
            self._vectors, self._vectors_version = {}, version
        cache, now = self._vectors, time.monotonic()
        found = {s: hit[1] for s in request.seeds if (hit := cache.get(s)) is not None and hit[0] > now}
        missing = [s for s in request.seeds if s not in found]
        if missing:
            fetched = self.index.vectors(missing, request.timeout_s)
            if len(cache) + len(fetched) > SEED_VECTOR_CACHE_ITEMS:
                cache.clear()
            for item_id, vector in fetched.items():
                cache[item_id] = (now + ttl, vector)
            found.update(fetched)
        return {s: found[s] for s in request.seeds if s in found}

    def item2item(self, request: Request, k: int) -> SourceResult:
        _, per_seed_hits = self.near(request)
        if not per_seed_hits:
            return []
        per_seed = max(1, k // len(per_seed_hits))
        merged: dict[str, float] = {}
        for hits in per_seed_hits:
            for item_id, score in hits[:per_seed]:
                merged[item_id] = max(score, merged.get(item_id, float("-inf")))
        return sorted(merged.items(), key=lambda kv: -kv[1])[:k]

    def covisit(self, request: Request, k: int) -> SourceResult:
        if not request.seeds:
            return []
        merged: dict[str, float] = {}
        # The current/most recent item counts most: weight 1, 1/2, 1/3 ...
        for rank, rows in enumerate(self.signals.neighbours(request.seeds, k + len(request.exclude))):
            for item_id, weight in rows:
                if item_id not in request.exclude:
                    merged[item_id] = merged.get(item_id, 0.0) + weight / (rank + 1)
        return sorted(merged.items(), key=lambda kv: -kv[1])[:k]

    def filtered(self, request: Request) -> dict[str, SourceResult]:
        """``content`` and ``fresh`` in ONE index call (MilvusItemIndex.search_each): both rank by the
        user vector under the region, one within the user's top categories, one among fresh items."""
        return request.filtered.get(lambda: self._filtered(request))  # type: ignore[no-any-return]

    def _filtered_source(self, request: Request, name: str) -> SourceResult:
        if self.config.share_filtered_search:
            return self.filtered(request).get(name, [])
        return self._filtered(request, (name,)).get(name, [])

    def _filtered(self, request: Request, names: tuple[str, ...] = ("content", "fresh")) -> dict[str, SourceResult]:
        if request.user_vector is None:
            return {}
        wants: dict[str, tuple[SearchFilter, int]] = {}
        categories = self._content_categories(request.ctx) if "content" in names else ()
        if categories and (k := request.quotas.get("content", 0)):
            wants["content"] = (SearchFilter(categories=categories, region=request.region), k)
        if "fresh" in names and (k := request.quotas.get("fresh", 0)):
            # On the hour: the same filter all hour long (the index remembers how many items pass it).
            since = int(request.ctx.now.timestamp() - self.config.fresh_days * 86400) // 3600 * 3600
            wants["fresh"] = (SearchFilter(region=request.region, fresh_since=since), k)
        found = self.index.search_each(request.user_vector, [(flt, self._overfetch(request, k))
                                                             for flt, k in wants.values()], request.timeout_s)
        return {name: self._filter(request, rows, k) for (name, (_, k)), rows in zip(wants.items(), found, strict=True)}

    def _content_categories(self, ctx: UserContext) -> tuple[str, ...]:
        """The user's top categories by affinity (by stated preference where they have none yet)."""
        top = sorted(ctx.category_affinity.items(), key=lambda kv: -kv[1])[: self.config.content_categories]
        return tuple(c for c, _ in top) or tuple(ctx.preferred_categories[: self.config.content_categories])

    def content(self, request: Request, k: int) -> SourceResult:
        return self._filtered_source(request, "content")[:k]

    def trending_region(self, request: Request, k: int) -> SourceResult:
        if not request.ctx.region:
            return []
        return self._filter(request, self.signals.trending(request.ctx.region, k + len(request.exclude)), k)

    def trending(self, request: Request, k: int) -> SourceResult:
        return self._filter(request, self.signals.trending(None, k + len(request.exclude)), k)

    def fresh(self, request: Request, k: int) -> SourceResult:
        return self._filtered_source(request, "fresh")[:k]

    @staticmethod
    def _filter(request: Request, rows: SourceResult, k: int) -> SourceResult:
        return [(i, s) for i, s in rows if i not in request.exclude][:k]

    # -- running and merging --------------------------------------------------------
    def _quotas(self, quotas: dict[str, int] | None) -> dict[str, int]:
        chosen = quotas if quotas is not None else self.config.quotas
        return {name: k for name, k in chosen.items() if k > 0 and name in self.sources}

    def _run_one(self, name: str, request: Request, k: int) -> SourceResult:
        started = time.perf_counter()
        try:
            return self.sources[name](request, k)
        finally:
            request.timings_ms[name] = (time.perf_counter() - started) * 1000

    def generate_sync(self, ctx: UserContext, quotas: dict[str, int] | None = None,
                      max_candidates: int | None = None) -> list[Candidate]:
        """All sources one after another, no timeouts (precompute flow, offline evaluation)."""
        request = self.prepare(ctx, quotas)
        results: dict[str, SourceResult] = {}
        for name, k in request.quotas.items():
            try:
                results[name] = self._run_one(name, request, k)
            except Exception as exc:  # noqa: BLE001 (a failing source is skipped, never fatal)
                request.failed[name] = describe(exc)
                log.warning("candidate_source_failed source=%s user_id=%s error=%s", name, ctx.user_id, describe(exc))
        return merge(results, max_candidates or self.config.max_candidates)

    async def generate(self, ctx: UserContext, quotas: dict[str, int] | None = None,
                       max_candidates: int | None = None, trace: dict[str, Any] | None = None,
                       budget_s: float | None = None) -> list[Candidate]:
        """All sources concurrently in threads, each under its timeout, the whole under the total budget.

        ``budget_s``: the caller's own deadline for this stage; the merge happens by then (with the
        sources that answered), so the caller never has to cancel the stage and lose them all.
        ``trace``, when given, receives ``timings_ms`` and ``failed`` (source -> reason skipped).
        """
        loop = asyncio.get_running_loop()
        # Inline, not in the pool: the user tower takes well under a millisecond, and a pool
        # still busy with earlier timed-out searches must not delay the start of this request.
        request = self.prepare(ctx, quotas)
        request.timeout_s = self.config.source_timeout_s
        futures = {
            name: asyncio.wait_for(
                loop.run_in_executor(self.signals_executor if name in SIGNAL_SOURCES else self.executor,
                                     self._run_one, name, request, k),
                timeout=self.config.source_timeout_s)
            for name, k in request.quotas.items()
        }
        tasks = {name: asyncio.ensure_future(f) for name, f in futures.items()}
        total = self.config.total_timeout_s if budget_s is None else min(self.config.total_timeout_s, budget_s)
        try:
            done, pending = await asyncio.wait(tasks.values(), timeout=total)
        finally:
            for task in tasks.values():
                # Cancelled from outside, or past the total: nobody reads these results. Collect
                # their exceptions so asyncio does not log each one with a traceback (on the
                # event loop, under load: measured at ~2 per request when budgets were missed).
                task.cancel()
                task.add_done_callback(_collect)
        results: dict[str, SourceResult] = {}
        for name, task in tasks.items():
            if task in pending:
                request.failed[name] = "total budget exceeded"
            elif task.exception() is not None:
                exc = task.exception()
                request.failed[name] = "timeout" if isinstance(exc, TimeoutError) else describe(exc)
            else:
                results[name] = task.result()
        for name, why in request.failed.items():
            log.warning("candidate_source_skipped source=%s user_id=%s reason=%s", name, ctx.user_id, why)
        if trace is not None:
            trace.update(timings_ms=dict(request.timings_ms), failed=dict(request.failed))
        return merge(results, max_candidates or self.config.max_candidates)


def describe(exc: BaseException) -> str:
    """Type and message: pymilvus' MilvusException keeps its code and message out of ``args``,
    so ``repr()`` gave only "MilvusException()" in the logs."""
    return f"{type(exc).__name__}: {exc}"


def _collect(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def merge(results: dict[str, SourceResult], max_candidates: int) -> list[Candidate]:
    """Round-robin by rank across sources (so a cap keeps every source's best), de-duplicated.

    Each candidate keeps every source that found it with that source's score;
    its score is reciprocal-rank fusion over them, and the list is sorted by it.
    """
    # Plain dicts while merging, one Candidate per item at the end: this loop runs ~1,000 times
    # per request on the event loop, and a Candidate plus a method call per hit cost ~15% more.
    found: dict[str, dict[str, float]] = {}
    fused: dict[str, float] = {}
    # Only the sources with a hit at this rank, in their order: rank by rank, a list drops out
    # when it runs out.
    active: Sequence[tuple[str, SourceResult]] = [(name, rows) for name, rows in results.items() if rows]
    rank, shortest = 0, min((len(rows) for _, rows in active), default=0)
    while active:
        bonus = 1.0 / (RRF_K + rank)
        for name, rows in active:
            item_id, score = rows[rank]
            sources = found.get(item_id)
            if sources is None:
                if len(found) >= max_candidates:
                    continue
                found[item_id] = {name: score}
                fused[item_id] = bonus
            else:
                if score > sources.get(name, float("-inf")):
                    sources[name] = score
                fused[item_id] += bonus
        rank += 1
        if rank == shortest:
            active = [(name, rows) for name, rows in active if len(rows) > rank]
            shortest = min((len(rows) for _, rows in active), default=0)
    # Best first; equal scores keep the order they were found in (a stable sort, reversed).
    return [Candidate(item_id=i, sources=found[i], score=fused[i], reasons=sorted(found[i]))
            for i in sorted(fused, key=fused.__getitem__, reverse=True)]
