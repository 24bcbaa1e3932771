"""Feast definitions: entity -> push source -> feature view, for every feature the flows write.

Every view is fed by a push source: flows/features.py writes the online store
directly in micro-batches (the Kappa path), and the Parquet batch sources behind
the push sources are where offline snapshots go. The training set itself is the
event archive (flows/archive.py): features are re-derived from the log.

TTL is 0 (never expire) on every view: a user inactive for a month still has
a profile and a long-term taste, and windowed counts carry their own as-of time.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float64, Int64, String

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="An end user.")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING, description="A recommendable item.")

NO_TTL = timedelta(0)


def _push_source(name: str) -> PushSource:
    # The batch source is where offline snapshots of this view live (Parquet).
    batch = FileSource(name=f"{name}_batch", path=f"data/{name}.parquet", timestamp_field="event_timestamp")
    return PushSource(name=f"{name}_push", batch_source=batch)


user_profile_push = _push_source("user_profile")
user_short_term_push = _push_source("user_short_term")
user_long_term_push = _push_source("user_long_term")
item_metadata_push = _push_source("item_metadata")
item_stats_push = _push_source("item_stats")

# From catalog.users: who the user is; changes rarely.
user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=NO_TTL,
    schema=[
        Field(name="region", dtype=String),
        Field(name="language", dtype=String),
        Field(name="age_bucket", dtype=String),
        Field(name="gender", dtype=String),
        Field(name="occupation", dtype=String),
        Field(name="status", dtype=String),
        Field(name="preferred_categories", dtype=Array(String)),
    ],
    source=user_profile_push,
    online=True,
    description="Profile from catalog.users.",
)

# Session-scale state: what the user just did, and the taste it shows (72 h half-life).
user_short_term = FeatureView(
    name="user_short_term",
    entities=[user],
    ttl=NO_TTL,
    schema=[
        Field(name="recent_items", dtype=Array(String), description="Last 50 items, most recent first."),
        Field(name="recent_types", dtype=Array(String), description="Interaction type of each recent item."),
        Field(name="recent_ts", dtype=Array(Float64), description="Event time (epoch s) of each recent item."),
        Field(name="affinity_categories", dtype=Array(String), description="Categories, strongest first."),
        Field(name="affinity_scores", dtype=Array(Float64), description="Decayed affinity, as of affinity_as_of."),
        Field(name="affinity_as_of", dtype=Float64),
        Field(name="session_events", dtype=Int64),
        Field(name="session_start", dtype=Float64),
        Field(name="last_active", dtype=Float64),
    ],
    source=user_short_term_push,
    online=True,
    description="Recent interactions, decayed category affinity, session counters.",
)

# Months-scale taste and lifetime counters: stable signals for cold sessions.
user_long_term = FeatureView(
    name="user_long_term",
    entities=[user],
    ttl=NO_TTL,
    schema=[
        Field(name="long_term_categories", dtype=Array(String)),
        Field(name="long_term_scores", dtype=Array(Float64)),
        Field(name="total_events", dtype=Int64),
        Field(name="total_likes", dtype=Int64),
        Field(name="total_skips", dtype=Int64),
        Field(name="total_watch_seconds", dtype=Float64),
    ],
    source=user_long_term_push,
    online=True,
    description="Long-term category preferences (90-day half-life) and lifetime counters.",
)

# From catalog.items: what the policy filters need (status, regions, maturity).
item_metadata = FeatureView(
    name="item_metadata",
    entities=[item],
    ttl=NO_TTL,
    schema=[
        Field(name="category", dtype=String),
        Field(name="tags", dtype=Array(String)),
        Field(name="language", dtype=String),
        Field(name="regions", dtype=Array(String), description="Empty means everywhere."),
        Field(name="status", dtype=String),
        Field(name="published_at", dtype=Float64),
        Field(name="maturity_rating", dtype=String),
    ],
    source=item_metadata_push,
    online=True,
    description="Item metadata from catalog.items.",
)

_WINDOW_FIELDS = [
    Field(name=f"{stat}_{window}", dtype=Float64)
    for window in ("1h", "24h", "7d")
    for stat in ("views", "clicks", "likes", "skips", "watch_seconds")
]

# Ranking signals; windows are as of stats_as_of (the item's newest event time).
item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=NO_TTL,
    schema=[
        Field(name="views", dtype=Int64),
        Field(name="clicks", dtype=Int64),
        Field(name="watches", dtype=Int64),
        Field(name="likes", dtype=Int64),
        Field(name="skips", dtype=Int64),
        Field(name="impressions", dtype=Int64),
        Field(name="watch_seconds", dtype=Float64),
        *_WINDOW_FIELDS,
        Field(name="ctr", dtype=Float64, description="CTR with a Beta prior."),
        Field(name="trending_score", dtype=Float64, description="Log of time-decayed popularity."),
        Field(name="stats_as_of", dtype=Float64),
    ],
    source=item_stats_push,
    online=True,
    description="Counts (total, 1 h, 24 h, 7 d), CTR with a Beta prior, trending score.",
)

ENTITIES = [user, item]
PUSH_SOURCES = [user_profile_push, user_short_term_push, user_long_term_push, item_metadata_push, item_stats_push]
FEATURE_VIEWS = [user_profile, user_short_term, user_long_term, item_metadata, item_stats]
USER_VIEWS = [user_profile, user_short_term, user_long_term]
ITEM_VIEWS = [item_metadata, item_stats]
