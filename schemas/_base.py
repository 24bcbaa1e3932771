"""Shared model configuration and field types for every schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

# Identifiers travel as strings everywhere (Kafka keys, Redis keys, Milvus
# primary keys); a bounded charset keeps them safe inside Redis key names.
Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@\-]+$"),
]
ShortText = Annotated[str, StringConstraints(max_length=64)]


def utc_now() -> datetime:
    """Timezone-aware now in UTC."""
    return datetime.now(UTC)


class Record(BaseModel):
    """Base of every cross-process record: strict about unknown fields."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    def to_json(self) -> bytes:
        """Compact JSON bytes, the wire format on every topic."""
        # pydantic-core writes the JSON itself: the same bytes as orjson over model_dump(mode="json"),
        # without the intermediate dict (5 vs 7 us for an impression of 10 items).
        return self.__pydantic_serializer__.to_json(self, exclude_none=True)

    @classmethod
    def from_json(cls, raw: bytes | str):  # type: ignore[no-untyped-def]
        """Parse and validate one wire record (raises pydantic.ValidationError)."""
        return cls.model_validate_json(raw)
