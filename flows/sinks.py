"""The feature sink: flushed feature documents -> compact Redis keys, trending ZSETs and Feast.

In:  ("profile", UserProfile) | ("user", UserFeatures doc) | ("item", ItemFeatures doc)
     | ("item_meta", (item_id, metadata, catalog updated_at in epoch µs)), on change only
     | ("trending", (region | None, score)), in micro-batches from flows/features.
Out: one batch of Redis commands per micro-batch: SET documents, ZADD trending and
     trim to the configured size, one HSET per entity into Feast's online store layout
     (feature_repo.store.OnlineWriter), and one XADD to the catalog-changes stream per
     item whose catalog metadata changed (API processes evict it from their caches).

Every write is an overwrite keyed by entity, so replaying a batch is harmless.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
from bytewax.outputs import StatelessSinkPartition

from feature_repo.store import execute_commands
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


def item_stats_row(doc: dict[str, Any]) -> dict[str, Any]:
    """An ItemFeatures doc -> the item_stats feature values."""
    stats = {name: doc[name] for name in ("views", "clicks", "watches", "likes", "skips", "impressions",
                                          "watch_seconds", "ctr", "trending_score", "stats_as_of")}
    for window, values in doc["windows"].items():
        for stat, value in values.items():
            stats[f"{stat}_{window}"] = value
    return stats


def item_metadata_row(meta: dict[str, Any]) -> dict[str, Any]:
    """An item's metadata (ItemFeatures fields from the catalog) -> the item_metadata feature values."""
    row = {name: meta.get(name) for name in ("category", "tags", "language", "status", "published_at",
                                             "maturity_rating")}
    row["regions"] = meta.get("regions") or []
    return row


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
        metas: dict[str, tuple[dict[str, Any], int]] = {}
        trending: dict[str | None, dict[str, float]] = {}
        for kind, payload in items:
            if kind == "user":
                users[payload["user_id"]] = payload
            elif kind == "item":
                items_[payload["item_id"]] = payload
            elif kind == "item_meta":
                metas[payload[0]] = (payload[1], payload[2])
            elif kind == "profile":
                profiles[payload.user_id] = payload
            elif kind == "trending":
                region, (item_id, score) = payload[0], payload[1]
                trending.setdefault(region, {})[item_id] = score
        # Documents, trending lists and Feast rows go out as one batch of commands: one
        # round trip per micro-batch.
        commands: list[tuple[Any, ...]] = []
        for user_id, doc in users.items():
            commands.append(("SET", self.keys.user_features(user_id), orjson.dumps(doc)))
        for item_id, doc in items_.items():
            commands.append(("SET", self.keys.item_features(item_id), orjson.dumps(doc)))
        # After the documents: an API process that reads a change finds the new document.
        changes, changes_keep = self.keys.catalog_changes(), self.settings.features.catalog_changes_keep
        for item_id in metas:
            commands.append(("XADD", changes, "MAXLEN", "~", changes_keep, "*", "item_id", item_id))
        for user_id, profile in profiles.items():
            commands.append(("SET", self.keys.user_profile(user_id), profile.to_json()))
        keep = self.settings.features.trending_keep
        for region, scores in trending.items():
            key = self.keys.trending(region)
            commands.append(("ZADD", key, *(part for item_id, score in scores.items() for part in (score, item_id))))
            # Keep the top `keep` (plus slack so a trim is not needed on every batch).
            commands.append(("ZREMRANGEBYRANK", key, 0, -(keep + 1)))
        commands += self._feast_commands(users, items_, metas, profiles)
        execute_commands(self.client, commands)
        self.writes += len(users) + len(items_) + len(profiles)

    def _feast_commands(self, users: dict[str, dict[str, Any]], items: dict[str, dict[str, Any]],
                        metas: dict[str, tuple[dict[str, Any], int]],
                        profiles: dict[str, UserProfile]) -> list[tuple[Any, ...]]:
        rows: dict[str, list[tuple[str, dict[str, Any], datetime | int]]] = {}
        short, long = rows.setdefault("user_short_term", []), rows.setdefault("user_long_term", [])
        for user_id, doc in users.items():
            ts = _ts(doc["updated_at"])
            views = user_rows(doc)
            short.append((user_id, views["user_short_term"], ts))
            long.append((user_id, views["user_long_term"], ts))
        stats = rows.setdefault("item_stats", [])
        for item_id, doc in items.items():
            stats.append((item_id, item_stats_row(doc), _ts(doc["updated_at"])))
        # Metadata rows are stamped with the catalog record's time: the same in every replay.
        rows["item_metadata"] = [(item_id, item_metadata_row(meta), meta_us)
                                 for item_id, (meta, meta_us) in metas.items()]
        rows["user_profile"] = [(user_id, profile_row(profile), profile.updated_at.astimezone(UTC))
                                for user_id, profile in profiles.items()]
        return self.feast.commands({view: batch for view, batch in rows.items() if batch})

    def close(self) -> None:
        self.client.close()

