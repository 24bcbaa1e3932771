"""Data passed between pipeline stages (in-process only, never on the wire)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass(slots=True)
class UserContext:
    """Everything the pipeline knows about the user and the request, read once per request."""

    user_id: str
    surface: str = "homepage"
    limit: int = 10
    region: str | None = None
    language: str | None = None
    age_bucket: str | None = None
    device: str | None = None
    current_item_id: str | None = None
    # Most recent first: (item_id, interaction_type, epoch seconds).
    recent: list[tuple[str, str, float]] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    # Category -> decayed affinity (larger = stronger), from the features flow.
    category_affinity: dict[str, float] = field(default_factory=dict)
    preferred_categories: list[str] = field(default_factory=list)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def recent_item_ids(self) -> list[str]:
        return [item_id for item_id, _, _ in self.recent]

    @property
    def is_cold(self) -> bool:
        return not self.recent


@dataclass(slots=True)
class Candidate:
    """One item moving through the pipeline, with where it came from and why it moved."""

    item_id: str
    # Source name ("ann", "item2item", "covisit", "trending", "trending_region", "content", "fresh", ...)
    # -> that source's own score (higher is better within the source).
    sources: dict[str, float] = field(default_factory=dict)
    score: float = 0.0
    reasons: list[str] = field(default_factory=list)
