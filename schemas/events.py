"""Records on the event log: interactions, impressions and dead letters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import ClassVar

import orjson
from pydantic import Field, field_validator

from schemas._base import Identifier, Record, ShortText, utc_now


class InteractionType(StrEnum):
    view = "view"
    click = "click"
    watch = "watch"
    like = "like"
    skip = "skip"
    impression = "impression"


class Surface(StrEnum):
    homepage = "homepage"
    up_next = "up_next"
    related = "related"


class Device(StrEnum):
    mobile = "mobile"
    web = "web"
    tv = "tv"


def new_event_id() -> str:
    """A fresh random event id (producers should send their own for safe retries)."""
    return uuid.uuid4().hex


class InteractionEvent(Record):
    """One user-item interaction: the unit of the Kappa log (topic ``interactions``).

    ``event_id`` makes every consumer idempotent: the log is at-least-once, so a
    retried POST or a replayed partition may deliver an event twice and every
    consumer de-duplicates on it.
    """

    event_id: Identifier = Field(default_factory=new_event_id, description="De-duplication key; send your own to make retries safe.")
    user_id: Identifier
    item_id: Identifier
    interaction_type: InteractionType
    interaction_value: float | None = Field(
        default=None,
        ge=0,
        le=1e7,
        description="watch: seconds watched; rating-like signals: the value; else unused.",
    )
    surface: Surface | None = None
    device: Device | None = None
    region: ShortText | None = None
    timestamp: datetime = Field(default_factory=utc_now, description="Event time (ISO 8601, timezone-aware).")
    request_id: Identifier | None = Field(default=None, description="The recommendation request that showed the item, if any.")
    position: int | None = Field(default=None, ge=0, le=10_000)

    @field_validator("timestamp")
    @classmethod
    def _require_timezone(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("timestamp must carry a timezone (e.g. 2024-01-01T12:00:00Z)")
        # The same instant in the standard library's UTC: the parser's own tzinfo makes
        # every later .timestamp() several times slower, and the flows read it per step.
        return value.astimezone(UTC)


class ImpressionRecord(Record):
    """One served recommendation list (topic ``impressions``)."""

    request_id: Identifier
    user_id: Identifier
    surface: Surface
    item_ids: list[Identifier]
    scores: list[float] = Field(default_factory=list)
    served_from: str
    device: Device | None = None
    region: ShortText | None = None
    timestamp: datetime = Field(default_factory=utc_now)

    @classmethod
    def wire_json(cls, request_id: str, user_id: str, surface: Surface, item_ids: list[str], scores: list[float],
                  served_from: str, device: Device | None, region: str | None, timestamp: datetime) -> bytes:
        """The record's ``to_json()`` bytes, from values the server validated or made itself.

        For the serving hot path (every served list is one impression): no model
        instance is built, 4 us instead of 15 (model_construct + to_json). A unit test
        checks that the bytes are those of the validated record.
        """
        fields = {"request_id": request_id, "user_id": user_id, "surface": surface, "item_ids": item_ids,
                  "scores": scores, "served_from": served_from, "device": device, "region": region,
                  "timestamp": timestamp}
        return orjson.dumps({k: v for k, v in fields.items() if v is not None}, option=orjson.OPT_UTC_Z)


class ControlCommand(Record):
    """An operator command on the ``control`` topic (e.g. model refresh)."""

    command: str = Field(pattern=r"^[a-z_]+$")
    command_id: Identifier = Field(default_factory=new_event_id)
    args: dict[str, str] = Field(default_factory=dict)
    requested_by: str | None = None
    timestamp: datetime = Field(default_factory=utc_now)


class DeadLetterRecord(Record):
    """A rejected record and why (topic ``dead-letter``): nothing is dropped silently."""

    source: str = Field(description="Who rejected it: 'api', or the flow/step name.")
    reason: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    payload: str = Field(description="The original payload, utf-8 with replacement, truncated.")
    payload_truncated: bool = False
    received_at: datetime = Field(default_factory=utc_now)

    MAX_PAYLOAD_CHARS: ClassVar[int] = 16_384

    @classmethod
    def wrap(cls, *, source: str, reason: str, payload: bytes | str | None, **where: object) -> DeadLetterRecord:
        """Build a dead letter from a raw payload of any size or encoding."""
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else (payload or "")
        truncated = len(text) > cls.MAX_PAYLOAD_CHARS
        return cls(
            source=source,
            reason=reason[:2000],
            payload=text[: cls.MAX_PAYLOAD_CHARS],
            payload_truncated=truncated,
            **where,  # type: ignore[arg-type]
        )
