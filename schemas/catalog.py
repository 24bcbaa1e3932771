"""Catalog records: items and user profiles (topics ``catalog.items`` / ``catalog.users``).

A delete is an explicit record with ``status="deleted"``, never a null-value
tombstone: the embedded broker does not deliver tombstones (DESIGN.md).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from schemas._base import Identifier, Record, ShortText, utc_now


class ItemStatus(StrEnum):
    active = "active"
    unavailable = "unavailable"
    deleted = "deleted"


class UserStatus(StrEnum):
    active = "active"
    suspended = "suspended"
    deleted = "deleted"


class MaturityRating(StrEnum):
    """Audience rating; the re-ranker compares it with the user's age bucket."""

    G = "G"
    PG = "PG"
    PG13 = "PG-13"
    R = "R"
    NC17 = "NC-17"


class AgeBucket(StrEnum):
    under_18 = "<18"
    a18_24 = "18-24"
    a25_34 = "25-34"
    a35_44 = "35-44"
    a45_54 = "45-54"
    a55_plus = "55+"


class ItemRecord(Record):
    """A recommendable item as published on ``catalog.items``."""

    item_id: Identifier
    type: ShortText = "video"
    title: str | None = Field(default=None, max_length=512)
    category: ShortText | None = None
    tags: list[ShortText] = Field(default_factory=list, max_length=64)
    language: ShortText | None = None
    regions: list[ShortText] | None = Field(
        default=None, max_length=256, description="Where the item may be shown; null means everywhere."
    )
    creator_id: Identifier | None = None
    published_at: datetime | None = None
    status: ItemStatus = ItemStatus.active
    maturity_rating: MaturityRating | None = None
    updated_at: datetime = Field(default_factory=utc_now)


class UserPreferences(Record):
    categories: list[ShortText] = Field(default_factory=list, max_length=64)


class UserProfile(Record):
    """A user's profile as published on ``catalog.users``."""

    user_id: Identifier
    language: ShortText | None = None
    region: ShortText | None = None
    age_bucket: AgeBucket | None = None
    gender: ShortText | None = None
    occupation: ShortText | None = None
    account_created_at: datetime | None = None
    status: UserStatus = UserStatus.active
    preferences: UserPreferences = Field(default_factory=UserPreferences)
    updated_at: datetime = Field(default_factory=utc_now)
