"""The API's in-process cache of item documents, on the real Redis: what it keeps and that the collector lets go of it."""

from __future__ import annotations

import asyncio
import gc

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from serving.config import Settings
from serving.features import OnlineFeatures

pytestmark = pytest.mark.integration


def test_cached_item_documents_keep_what_ranking_reads_and_leave_the_collectors_view(settings: Settings) -> None:
    plain = redis.Redis.from_url(settings.redis.url)
    plain.set(settings.keys.item_features("gc1"), orjson.dumps({
        "item_id": "gc1", "category": "Drama", "tags": ["Drama", "90s"], "regions": ["us-west"], "status": "active",
        "clicks": 3, "impressions": 40, "ctr": 0.07, "windows": {"1h": {"views": 2.0}}}))

    async def scenario() -> tuple[dict, dict]:
        client = aioredis.Redis.from_url(settings.redis.url)
        features = OnlineFeatures(settings, client)
        first = (await features.item_features(["gc1", "gc-missing"]))
        again = (await features.item_features(["gc1"]))
        await client.aclose()
        return first, again

    first, again = asyncio.run(scenario())
    plain.delete(settings.keys.item_features("gc1"))
    doc = first["gc1"]
    assert set(first) == {"gc1"}
    assert again["gc1"] is doc  # served from the cache within its TTL
    assert doc["regions"] == ("us-west",) and doc["tags"] == ("Drama", "90s")
    assert doc["category"] == "Drama" and doc["ctr"] == 0.07 and doc["clicks"] == 3
    assert "windows" not in doc
    gc.collect()
    assert not gc.is_tracked(doc)
