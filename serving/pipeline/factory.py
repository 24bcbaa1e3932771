"""Builds the Recommender with its real parts; one place for the API and the precompute flow."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from serving.config import Settings
from serving.pipeline.policies import PolicyConfig, PolicyEngine
from serving.pipeline.service import Recommender


def _observe(surface_of: Callable[[], str] | None = None) -> Callable[[str, float], None]:
    from serving import metrics

    def observe(stage: str, seconds: float) -> None:
        metrics.child(metrics.PIPELINE_STAGE_SECONDS, stage, "all").observe(seconds)

    return observe


def _count(name: str, label: str) -> None:
    from serving import metrics

    if name == "cache":
        metrics.child(metrics.CACHE_LOOKUPS, "recommendations", label).inc()
    elif name == "fallback":
        metrics.child(metrics.FALLBACKS, label).inc()


async def build_recommender(
    settings: Settings, redis: aioredis.Redis | None = None, publish: Callable[[str, str, bytes], None] | None = None,
) -> tuple[Recommender, Callable[[], Awaitable[None]]]:
    """The Recommender and an async close(); Redis is created here unless given."""
    from infra.milvus import MilvusItemIndex
    from model.ranker import HeavyRanker, LiveRanker
    from model.registry import LiveModel
    from serving.candidates.backends import RedisSignals
    from serving.candidates.generator import CandidateGenerator
    from serving.features import OnlineFeatures
    from serving.multiplexed_redis import MultiplexedRedis

    own_redis = redis is None
    client = redis or aioredis.Redis.from_url(settings.redis.url, socket_timeout=settings.redis.socket_timeout_s,
                                              socket_connect_timeout=settings.redis.socket_timeout_s)
    index = MilvusItemIndex(settings)
    # Checked and reloaded in a thread of its own: a model load never stalls the event loop.
    live_model = LiveModel(settings, background=True, load_ranker=HeavyRanker.load)
    await asyncio.to_thread(live_model.refresh)  # the first requests find the live version loaded
    candidates = CandidateGenerator(settings.retrieval, live_model, index, RedisSignals(settings))
    policy = PolicyEngine(PolicyConfig.load(Path(settings.recommend.policy_path) if settings.recommend.policy_path else None))
    reads = (MultiplexedRedis(settings.redis.url, settings.redis.socket_timeout_s)
             if settings.redis.multiplexed_reads else None)
    recommender = Recommender(settings, client, OnlineFeatures(settings, client, reads), candidates, policy,
                              heavy=LiveRanker(live_model), publish=publish, observe=_observe(), count=_count,
                              reads=reads)

    async def close() -> None:
        index.close()
        if reads is not None:
            await reads.aclose()
        if own_redis:
            await client.aclose()

    return recommender, close
