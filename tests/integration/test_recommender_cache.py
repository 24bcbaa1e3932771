"""The Recommender's cache path on the real Redis: staleness after new events, policies on cached lists.

The features reader and candidate generator are small in-test stand-ins (the
real ones are exercised end to end in tests/e2e); Redis, the cache format and
the policy engine are the real ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from schemas.api import RecommendationRequest
from serving.config import Settings
from serving.pipeline.policies import PolicyConfig, PolicyEngine
from serving.pipeline.service import Recommender
from serving.pipeline.types import Candidate, UserContext

pytestmark = pytest.mark.integration

ITEMS = {f"i{k}": {"status": "active", "category": f"c{k % 5}", "maturity_rating": "PG"} for k in range(40)}


class Features:
    async def user_context(self, user_id: str) -> UserContext:
        return UserContext(user_id=user_id, region="us-east", age_bucket="25-34", recent=[("i39", "like", 1.0)])

    async def item_features(self, item_ids: list[str]) -> dict[str, dict[str, Any]]:
        return {i: ITEMS[i] for i in item_ids if i in ITEMS}


class Candidates:
    def generate_sync(self, ctx: UserContext) -> list[Candidate]:
        return [Candidate(f"i{k}", sources={"ann": 1 - k / 40}) for k in range(39)]

    async def generate(self, ctx: UserContext, budget_s: float | None = None) -> list[Candidate]:
        return self.generate_sync(ctx)


def recommender(settings: Settings, client: aioredis.Redis, policy: dict[str, Any] | None = None) -> Recommender:
    config = PolicyConfig.model_validate({"exploration": {"enabled": False}, **(policy or {})})
    return Recommender(settings, client, Features(), Candidates(), PolicyEngine(config, seed=1))


def test_new_events_turn_a_cached_list_stale_and_it_is_revalidated(settings: Settings) -> None:
    settings = settings.model_copy(deep=True)
    settings.recommend.dirty_grace_s = 0.0  # no precompute flow here: the API recomputes at once

    async def scenario() -> list[str]:
        client = aioredis.Redis.from_url(settings.redis.url)
        rec = recommender(settings, client)
        request = RecommendationRequest(user_id="u1", limit=10)
        await rec.refresh_cache(homepage(await rec.features.user_context("u1")))
        served = [(await rec.recommend(request, "r1")).served_from]
        await rec.mark_dirty({"u1"})
        served.append((await rec.recommend(request, "r2")).served_from)
        await asyncio.sleep(0.3)  # the background revalidation rewrites the list
        served.append((await rec.recommend(request, "r3")).served_from)
        await client.aclose()
        return served

    assert asyncio.run(scenario()) == ["cache", "cache_stale", "cache"]


def test_pinned_item_and_filters_apply_to_cached_lists(settings: Settings) -> None:
    async def scenario() -> list[str]:
        client = aioredis.Redis.from_url(settings.redis.url)
        plain = recommender(settings, client)
        await plain.refresh_cache(homepage(await plain.features.user_context("u2")))
        ITEMS["i0"]["status"] = "deleted"  # deleted after the list was cached
        try:
            pinned = recommender(settings, client, {"pinned": [{"item_id": "i35", "position": 1}]})
            response = await pinned.recommend(RecommendationRequest(user_id="u2", limit=10), "r")
        finally:
            ITEMS["i0"]["status"] = "active"
            await client.aclose()
        assert response.served_from == "cache"
        return [r.item_id for r in response.recommendations]

    ids = asyncio.run(scenario())
    assert ids[1] == "i35" and "i0" not in ids and len(ids) == 10


def homepage(ctx: UserContext) -> UserContext:
    """The context the precompute flow uses: homepage surface, a whole cacheable list."""
    ctx.surface, ctx.limit = "homepage", 50
    return ctx


def test_lists_written_together_do_not_all_go_stale_together(settings: Settings) -> None:
    """Freshness is shortened by a random share up to recommend.cache_fresh_jitter (a revalidation herd spread out)."""
    settings = settings.model_copy(deep=True)
    settings.recommend.cache_fresh_s, settings.recommend.cache_fresh_jitter = 100.0, 0.2

    async def scenario() -> tuple[float, list[float]]:
        client = aioredis.Redis.from_url(settings.redis.url)
        rec = recommender(settings, client)
        before = time.time()
        users = [f"herd{n}" for n in range(40)]
        for user in users:
            await rec.refresh_cache(homepage(await rec.features.user_context(user)))
        raws = await client.mget([settings.keys.recommendations(user, "homepage") for user in users])
        await client.delete(*[settings.keys.recommendations(user, "homepage") for user in users])
        await client.aclose()
        return before, [orjson.loads(raw)["fresh_until"] - before for raw in raws]

    before, fresh_for = asyncio.run(scenario())
    assert all(80.0 - 1 <= f <= 100.0 + (time.time() - before) for f in fresh_for)
    assert max(fresh_for) - min(fresh_for) > 5.0  # 40 draws over a 20 s range


def test_within_the_grace_a_list_made_stale_by_events_is_left_to_the_precompute_flow(settings: Settings) -> None:
    """A recompute here right after the events could read features without them and stamp the list fresh."""
    settings = settings.model_copy(deep=True)
    settings.recommend.dirty_grace_s = 0.6

    async def scenario() -> list[str]:
        client = aioredis.Redis.from_url(settings.redis.url)
        rec = recommender(settings, client)
        request = RecommendationRequest(user_id="u3", limit=10)
        await rec.refresh_cache(homepage(await rec.features.user_context("u3")))
        await rec.mark_dirty({"u3"})
        served = [(await rec.recommend(request, "r1")).served_from]
        await asyncio.sleep(0.3)  # a revalidation, had one started, would have rewritten the list by now
        served.append((await rec.recommend(request, "r2")).served_from)
        await asyncio.sleep(0.4)  # past the grace: this request recomputes it
        served.append((await rec.recommend(request, "r3")).served_from)
        await asyncio.sleep(0.3)
        served.append((await rec.recommend(request, "r4")).served_from)
        await client.delete(settings.keys.recommendations("u3", "homepage"), settings.keys.recommendations_dirty("u3"))
        await client.aclose()
        return served

    assert asyncio.run(scenario()) == ["cache_stale", "cache_stale", "cache_stale", "cache"]
