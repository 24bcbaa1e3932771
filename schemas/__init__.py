"""The one source of truth for every record that crosses a process boundary.

Events on the log, catalog records, API bodies, topic names and Redis keys are
all spelled here and nowhere else. JSON Schema files generated from these
models live in ``schemas/jsonschema`` (``python -m schemas.export``).
"""

from schemas.api import (
    AcceptedResponse,
    CachedRecommendationsResponse,
    ErrorResponse,
    InteractionBatch,
    ItemUpsert,
    ModelRefreshResponse,
    RecommendationContext,
    RecommendationRequest,
    RecommendationResponse,
    RecommendedItem,
    UpdatedResponse,
    UserProfileUpdate,
)
from schemas.catalog import ItemRecord, ItemStatus, UserPreferences, UserProfile, UserStatus
from schemas.events import (
    DeadLetterRecord,
    Device,
    InteractionEvent,
    InteractionType,
    Surface,
)
from schemas.keys import RedisKeys
from schemas.topics import ALL_TOPICS, Topics, TopicSpec

__all__ = [
    "ALL_TOPICS",
    "AcceptedResponse",
    "CachedRecommendationsResponse",
    "DeadLetterRecord",
    "Device",
    "ErrorResponse",
    "InteractionBatch",
    "InteractionEvent",
    "InteractionType",
    "ItemRecord",
    "ItemStatus",
    "ItemUpsert",
    "ModelRefreshResponse",
    "RecommendationContext",
    "RecommendationRequest",
    "RecommendationResponse",
    "RecommendedItem",
    "RedisKeys",
    "Surface",
    "TopicSpec",
    "Topics",
    "UpdatedResponse",
    "UserPreferences",
    "UserProfile",
    "UserProfileUpdate",
    "UserStatus",
]
