"""The feature sink: flushed feature documents -> compact Redis keys, trending ZSETs and Feast.

In:  ("profile", UserProfile) | ("user", UserFeatures doc) | ("item", ItemFeatures doc)
     | ("trending", (region | None, score)), in micro-batches from flows/features.
Out: one Redis pipeline per batch (SET documents, ZADD trending, trim to the
     configured size) and one Feast ``online_write_batch`` per feature view.

Every write is an overwrite keyed by entity, so replaying a batch is harmless.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
from bytewax.outputs import StatelessSinkPartition

from flows._common import WriteLoad, redis_client
from schemas.catalog import UserProfile
from serving.config import Settings


def _ts(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def user_rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A UserFeatures doc -> Feast view name -> feature values."""
    affinity, long_term = doc["category_affinity"], doc["long_term_affinity"]
    return {
        "user_short_term": {
            "recent_items": [r["item_id"] for r in doc["recent"]],
            "recent_types": [r["interaction_type"] for r in doc["recent"]],
            "recent_ts": [r["ts"] for r in doc["recent"]],
            "affinity_categories": list(affinity), "affinity_scores": list(affinity.values()),
            "affinity_as_of": doc["affinity_as_of"], "session_events": doc["session_events"],
            "session_start": doc["session_start"], "last_active": doc["last_active"],
        },
        "user_long_term": {
            "long_term_categories": list(long_term), "long_term_scores": list(long_term.values()),
            "total_events": doc["total_events"], "total_likes": doc["total_likes"],
            "total_skips": doc["total_skips"], "total_watch_seconds": doc["total_watch_seconds"],
        },
    }


def item_rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An ItemFeatures doc -> Feast view name -> feature values."""
    stats = {name: doc[name] for name in ("views", "clicks", "watches", "likes", "skips", "impressions",
                                          "watch_seconds", "ctr", "trending_score", "stats_as_of")}
    for window, values in doc["windows"].items():
        for stat, value in values.items():
            stats[f"{stat}_{window}"] = value
    meta = {name: doc.get(name) for name in ("category", "tags", "language", "status", "published_at",
                                             "maturity_rating")}
    meta["regions"] = doc.get("regions") or []
    return {"item_metadata": meta, "item_stats": stats}


def profile_row(profile: UserProfile) -> dict[str, Any]:
    return {
        "region": profile.region, "language": profile.language,
        "age_bucket": str(profile.age_bucket) if profile.age_bucket else None,
        "gender": profile.gender, "occupation": profile.occupation, "status": str(profile.status),
        "preferred_categories": list(profile.preferences.categories),
    }


class FeaturePartition(StatelessSinkPartition[Any]):
    """Each worker writes its own keys; all writes are idempotent overwrites."""

    def __init__(self, settings: Settings) -> None:
        from feature_repo.store import OnlineWriter

        self.settings = settings
        self.keys = settings.keys
        self.client = redis_client(settings)
        self.feast = OnlineWriter(settings, self.client)
        self.writes = 0

    def write_batch(self, items: list[Any]) -> None:
        started = time.perf_counter()
        self._write(items)
        WriteLoad.record(time.perf_counter() - started)

    def _write(self, items: list[Any]) -> None:
        # The newest document per entity wins: a batch may hold several flushes of one key.
        users: dict[str, dict[str, Any]] = {}
        items_: dict[str, dict[str, Any]] = {}
        profiles: dict[str, UserProfile] = {}
        trending: dict[str | None, dict[str, float]] = {}
        for kind, payload in items:
            if kind == "user":
                users[payload["user_id"]] = payload
            elif kind == "item":
                items_[payload["item_id"]] = payload
            elif kind == "profile":
                profiles[payload.user_id] = payload
            elif kind == "trending":
                region, (item_id, score) = payload[0], payload[1]
                trending.setdefault(region, {})[item_id] = score
        pipe = self.client.pipeline(transaction=False)
        for user_id, doc in users.items():
            pipe.set(self.keys.user_features(user_id), orjson.dumps(doc))
        for item_id, doc in items_.items():
            pipe.set(self.keys.item_features(item_id), orjson.dumps(doc))
        for user_id, profile in profiles.items():
            pipe.set(self.keys.user_profile(user_id), profile.to_json())
        keep = self.settings.features.trending_keep
        for region, scores in trending.items():
            key = self.keys.trending(region)
            pipe.zadd(key, scores)
            # Keep the top `keep` (plus slack so a trim is not needed on every batch).
            pipe.zremrangebyrank(key, 0, -(keep + 1))
        pipe.execute()
        self._write_feast(users, items_, profiles)
        self.writes += len(users) + len(items_) + len(profiles)

    def _write_feast(self, users: dict[str, dict[str, Any]], items: dict[str, dict[str, Any]],
                     profiles: dict[str, UserProfile]) -> None:
        rows: dict[str, list[tuple[str, dict[str, Any], datetime]]] = {}
        for user_id, doc in users.items():
            ts = _ts(doc["updated_at"])
            for view, values in user_rows(doc).items():
                rows.setdefault(view, []).append((user_id, values, ts))
        for item_id, doc in items.items():
            ts = _ts(doc["updated_at"])
            for view, values in item_rows(doc).items():
                rows.setdefault(view, []).append((item_id, values, ts))
        for user_id, profile in profiles.items():
            rows.setdefault("user_profile", []).append((user_id, profile_row(profile),
                                                        profile.updated_at.astimezone(UTC)))
        self.feast.write_many(rows)

    def close(self) -> None:
        self.client.close()

