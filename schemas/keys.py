"""Every Redis key the system reads or writes, built in one place.

A prefix isolates deployments and test runs sharing one Redis.
"""

from __future__ import annotations


class RedisKeys:
    def __init__(self, prefix: str = "recsys:") -> None:
        self.prefix = prefix

    def recommendations(self, user_id: str, surface: str) -> str:
        """Precomputed list for (user, surface), written by flows/recommendations."""
        return f"{self.prefix}recs:{surface}:{user_id}"

    def recommendations_dirty(self, user_id: str) -> str:
        """Epoch seconds of the user's latest accepted event: cached lists computed before it are stale."""
        return f"{self.prefix}recs:dirty:{user_id}"

    def user_recent(self, user_id: str) -> str:
        return f"{self.prefix}user:recent:{user_id}"

    def item_neighbours(self, item_id: str) -> str:
        """Co-visitation neighbours of an item (sorted set)."""
        return f"{self.prefix}covisit:{item_id}"

    def trending(self, region: str | None = None) -> str:
        return f"{self.prefix}trending:{region or 'global'}"

    def item_meta(self, item_id: str) -> str:
        return f"{self.prefix}item:meta:{item_id}"

    def user_profile(self, user_id: str) -> str:
        """The user's latest catalog profile (JSON UserProfile), written by flows/features."""
        return f"{self.prefix}user:profile:{user_id}"

    def user_features(self, user_id: str) -> str:
        """The user's streaming features (JSON UserFeatures), written by flows/features."""
        return f"{self.prefix}user:features:{user_id}"

    def item_features(self, item_id: str) -> str:
        """The item's metadata + statistics (JSON ItemFeatures), written by flows/features."""
        return f"{self.prefix}item:features:{item_id}"

    def catalog_changes(self) -> str:
        """Stream of item ids whose catalog metadata changed (``item_id`` field), written by flows/features.

        API processes follow it to drop those items from their in-process feature cache at once.
        """
        return f"{self.prefix}catalog:changes"

    def flow_stats(self, flow: str) -> str:
        """Counters a flow publishes (hash: name -> value), e.g. dead letters."""
        return f"{self.prefix}flow:stats:{flow}"

    def log_progress(self, reader: str) -> str:
        """Highest offset per "topic:partition" that ``reader`` produced ("producer") or read (a flow's name).

        ZSET member -> offset; only ever raised (ZADD GT), so restarts and replicas cannot lower it.
        """
        return f"{self.prefix}progress:offsets:{reader}"

    def log_progress_readers(self) -> str:
        """The readers (producer, flow names) that noted progress (SET)."""
        return f"{self.prefix}progress:readers"

    def log_progress_time(self, reader: str) -> str:
        """Newest record time per topic (epoch ms) that ``reader`` produced or read (ZSET, ZADD GT)."""
        return f"{self.prefix}progress:time:{reader}"

    def api_key(self, key_hash: str) -> str:
        return f"{self.prefix}apikey:{key_hash}"

    def rate_limit(self, key_id: str) -> str:
        return f"{self.prefix}ratelimit:{key_id}"

    def exposure(self, user_id: str, day: str) -> str:
        return f"{self.prefix}exposure:{day}:{user_id}"

    def exposure_seen(self, day: str) -> str:
        """Request ids already counted into the day's exposure (replay-safe counting)."""
        return f"{self.prefix}exposure:{day}:seen"

    def model_registry(self) -> str:
        """Hash: ``live`` -> version, ``version:<v>`` -> ModelVersion JSON (model/registry.py)."""
        return f"{self.prefix}models"

    def model_training_lock(self) -> str:
        """Held by the trainer while it trains, so two refreshes never train at once."""
        return f"{self.prefix}models:training"

    def demo_loaded(self) -> str:
        """Marker set by the demo loader (value: the broker run it loaded into)."""
        return f"{self.prefix}demo:loaded"
