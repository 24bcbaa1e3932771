"""Online feature records: what flows/features writes to Redis and the API reads back.

The same values go to the Feast online store (feature_repo/, the store of
record for definitions, training reads and the debug endpoints) and, as one
compact JSON document per entity, to the keys in ``schemas.keys`` that the
serving hot path reads in a single MGET.

Decayed scores are stored "as of" a reference time (``affinity_as_of``) so
they are a pure function of the events seen, never of the wall clock: a replay
gives the same bytes. Readers decay them further to "now" if they need to.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from schemas._base import Record


class RecentInteraction(Record):
    item_id: str
    interaction_type: str
    ts: float = Field(description="Event time, epoch seconds.")


class UserFeatures(Record):
    """A user's streaming state (Feast views user_short_term and user_long_term)."""

    user_id: str
    recent: list[RecentInteraction] = Field(default_factory=list, description="Last interactions, most recent first.")
    consumed: list[str] = Field(default_factory=list, description="Items viewed/clicked/watched/liked, most recent first.")
    skipped: list[str] = Field(default_factory=list, description="Items skipped, most recent first.")
    category_affinity: dict[str, float] = Field(default_factory=dict, description="Short-term decayed weight per category, as of affinity_as_of.")
    long_term_affinity: dict[str, float] = Field(default_factory=dict, description="Long-term decayed weight per category, as of affinity_as_of.")
    affinity_as_of: float = 0.0
    total_events: int = 0
    total_likes: int = 0
    total_skips: int = 0
    total_watch_seconds: float = 0.0
    session_events: int = 0
    session_start: float = 0.0
    last_active: float = 0.0
    updated_at: datetime


class ItemFeatures(Record):
    """An item's metadata (from catalog.items) and statistics (Feast views item_metadata, item_stats)."""

    item_id: str
    category: str | None = None
    tags: list[str] = Field(default_factory=list)
    language: str | None = None
    regions: list[str] | None = None
    status: str = "unknown"
    published_at: float | None = None
    maturity_rating: str | None = None
    # Cumulative counts over every event (late ones included).
    views: int = 0
    clicks: int = 0
    watches: int = 0
    likes: int = 0
    skips: int = 0
    impressions: int = 0
    watch_seconds: float = 0.0
    # Windowed counts, as of stats_as_of (the item's newest event time).
    windows: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="'1h' | '24h' | '7d' -> {views, clicks, likes, skips, watch_seconds}."
    )
    ctr: float = Field(description="(clicks + alpha) / (impressions + alpha + beta): CTR with a Beta prior.")
    trending_score: float = Field(
        default=0.0,
        description="ln(sum of w * exp(t / tau)) (same as the trending ZSET): comparable across items; "
        "popularity now = exp(trending_score - now / tau).",
    )
    stats_as_of: float = 0.0
    updated_at: datetime


class FeatureValue(Record):
    value: Any = None
    updated_at: datetime | None = None


class OnlineFeaturesResponse(Record):
    """GET /users/{id}/features and /items/{id}/features: Feast online values, per view."""

    entity: str
    id: str
    views: dict[str, dict[str, FeatureValue]] = Field(description="Feast view -> feature -> value and update time.")
    serving: dict[str, Any] | None = Field(default=None, description="The documents the serving hot path reads.")
