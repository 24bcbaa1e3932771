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


def test_a_catalog_change_evicts_the_cached_item_and_a_stats_write_waits_for_the_ttl(settings: Settings) -> None:
    from datetime import UTC, datetime

    from flows.sinks import FeaturePartition
    from schemas.features import ItemFeatures

    sink = FeaturePartition(settings)
    plain = redis.Redis.from_url(settings.redis.url)

    def write(status: str, clicks: int, catalog_changed: bool) -> None:
        doc = ItemFeatures(item_id="cc1", category="Drama", status=status, clicks=clicks, ctr=0.05,
                           updated_at=datetime.now(UTC)).model_dump(mode="json")
        batch: list = [("item", doc)]
        if catalog_changed:
            batch.append(("item_meta", ("cc1", {"category": "Drama", "status": status}, 1_000_000)))
        sink.write_batch(batch)

    async def scenario() -> list[tuple[str, int]]:
        client = aioredis.Redis.from_url(settings.redis.url)
        features = OnlineFeatures(settings, client)
        poll = settings.features.reader_changes_poll_s
        seen = []
        try:
            write("active", 1, catalog_changed=True)
            doc = (await features.item_features(["cc1"]))["cc1"]
            seen.append((doc["status"], doc["clicks"]))
            write("active", 2, catalog_changed=False)  # statistics only: the cached copy stands (TTL)
            await asyncio.sleep(poll * 2)
            doc = (await features.item_features(["cc1"]))["cc1"]
            seen.append((doc["status"], doc["clicks"]))
            write("deleted", 3, catalog_changed=True)  # a catalog change: evicted at the next read of the stream
            await asyncio.sleep(poll * 2)
            doc = (await features.item_features(["cc1"]))["cc1"]
            seen.append((doc["status"], doc["clicks"]))
        finally:
            await client.aclose()
        return seen

    try:
        assert asyncio.run(scenario()) == [("active", 1), ("active", 1), ("deleted", 3)]
        entries = plain.xrange(settings.keys.catalog_changes())
        assert [fields[b"item_id"] for _, fields in entries][-2:] == [b"cc1", b"cc1"]
    finally:
        sink.close()
        plain.delete(settings.keys.item_features("cc1"), settings.keys.catalog_changes())
