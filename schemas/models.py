"""Model versions: the registry entry in Redis and the GET /models body.

The trainer writes a ``ModelVersion`` under ``RedisKeys.model_registry()`` (a
hash: ``live`` -> version, ``version:<v>`` -> JSON); the API, the catalog flow
and the precompute flow read it to load the live version. The record is
generic on purpose: a later ranker is versioned with the same entry.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas._base import Record, utc_now


class ModelVersion(Record):
    """One trained model version: where its artefacts are and how good it was offline."""

    version: str = Field(pattern=r"^[a-z0-9_]+$", description="Also names the Milvus collection.")
    kind: str = Field(default="two_tower", description="Which model family (two_tower, ranker, ...).")
    trained_at: datetime = Field(default_factory=utc_now)
    artefacts: str = Field(description="Folder with weights, id maps and metrics.")
    collection: str | None = Field(default=None, description="Milvus collection holding its item vectors.")
    status: Literal["building", "live", "retired", "failed"] = "building"
    training_events: int = 0
    training_items: int = 0
    training_seconds: float = 0.0
    source: str = Field(default="topic", description="Where the training log came from (topic | archive | file).")
    command_id: str | None = Field(default=None, description="The control command that asked for it.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Offline metrics on the held-out tail of the log.")


class ModelsResponse(Record):
    """GET /models: the live version and the ones kept beside it."""

    live: ModelVersion | None
    versions: list[ModelVersion] = Field(default_factory=list)


# ControlCommand.command values the trainer answers (schemas.events.ControlCommand).
REFRESH_COMMAND = "refresh_model"
