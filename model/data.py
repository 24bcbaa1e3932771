"""The training log, behind one function whatever its source.

In: the interactions topic (replayed from the beginning) or the Parquet archive
written by flows/archive.py (same field names as ``InteractionEvent``); the
catalog topics for item content and user profiles. Out: validated schema
records. Kappa: training reads the very events the flows read, never a
separate export with its own logic.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from pydantic import BaseModel, ValidationError

from infra.kafka import consumer_config
from schemas.catalog import ItemRecord, ItemStatus, UserProfile, UserStatus
from schemas.events import InteractionEvent
from schemas.topics import Topics, TopicSpec
from serving.config import Settings

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)


def replay_topic(settings: Settings, spec: TopicSpec) -> Iterator[tuple[bytes | None, bytes]]:
    """Every (key, value) on a topic from offset 0, ending after a streak of empty polls.

    tansu reports a wrong high watermark (DESIGN.md), so the end of the log is
    "nothing arrived for ``replay_idle_polls`` polls", not the watermark.
    Partitions are assigned directly: no group join, no committed offsets.
    """
    topic = settings.topic(spec)
    consumer = Consumer(consumer_config(settings, f"replay-{uuid.uuid4().hex}", **{"enable.auto.commit": False}))
    try:
        metadata = _metadata(consumer, topic)
        partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])
        idle = 0
        while idle < settings.model.replay_idle_polls:
            messages = consumer.consume(10_000, timeout=settings.model.replay_poll_timeout_s)
            idle = 0 if messages else idle + 1
            for message in messages:
                if message.error() is None and message.value() is not None:
                    yield message.key(), message.value()
    finally:
        consumer.close()


def _metadata(consumer: Consumer, topic: str, attempts: int = 5):  # type: ignore[no-untyped-def]
    """Topic metadata, retried: a fresh connection to tansu now and then fails its first request."""
    for attempt in range(attempts):
        try:
            return consumer.list_topics(topic, timeout=10)
        except KafkaException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _parse_all(raw: Iterator[tuple[bytes | None, bytes]], model: type[R]) -> Iterator[R]:
    for _key, value in raw:
        try:
            yield model.model_validate_json(value)
        except ValidationError as exc:
            # The flows already dead-letter bad records; training just skips them.
            log.warning("training_record_skipped model=%s error=%s", model.__name__, exc.errors()[:1])


def read_interactions_from_topic(settings: Settings) -> list[InteractionEvent]:
    return list(_parse_all(replay_topic(settings, Topics.INTERACTIONS), InteractionEvent))


def read_interactions_from_archive(root: Path) -> list[InteractionEvent]:
    """Every event in the Parquet files under ``root`` (any partitioning, e.g. by day)."""
    import pyarrow.parquet as pq

    events: list[InteractionEvent] = []
    fields = set(InteractionEvent.model_fields)
    for path in sorted(Path(root).rglob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            clean = {k: v for k, v in row.items() if k in fields and v is not None}
            ts = clean.get("timestamp")
            if ts is not None and getattr(ts, "tzinfo", None) is None and not isinstance(ts, str | int):
                clean["timestamp"] = ts.replace(tzinfo=UTC)  # Parquet timestamps may come back naive
            try:
                events.append(InteractionEvent.model_validate(clean))
            except ValidationError as exc:
                log.warning("archive_record_skipped path=%s error=%s", path, exc.errors()[:1])
    return events


def archive_root(settings: Settings) -> Path:
    root = settings.model.archive_dir
    return root if root.is_absolute() else Path(settings.stack.state_dir) / root


def read_interactions(settings: Settings, source: str | None = None) -> list[InteractionEvent]:
    """The training log from the configured source ("topic" or "archive"), in no particular order."""
    source = source or settings.model.training_source
    readers: dict[str, Callable[[], list[InteractionEvent]]] = {
        "topic": lambda: read_interactions_from_topic(settings),
        "archive": lambda: read_interactions_from_archive(archive_root(settings)),
    }
    if source not in readers:
        raise ValueError(f"unknown training source {source!r}; use one of {sorted(readers)}")
    return readers[source]()


def latest_by_key(records: Iterator[R], key: Callable[[R], str]) -> dict[str, R]:
    """The last record per id in log order: the replayed state of a catalog topic."""
    latest: dict[str, R] = {}
    for record in records:
        latest[key(record)] = record
    return latest


def read_catalog(settings: Settings) -> list[ItemRecord]:
    """The current catalog: latest record per item, deleted/unavailable ones left out."""
    items = latest_by_key(_parse_all(replay_topic(settings, Topics.CATALOG_ITEMS), ItemRecord), lambda r: r.item_id)
    return [item for item in items.values() if item.status == ItemStatus.active]


def read_users(settings: Settings) -> dict[str, UserProfile]:
    users = latest_by_key(_parse_all(replay_topic(settings, Topics.CATALOG_USERS), UserProfile), lambda r: r.user_id)
    return {uid: user for uid, user in users.items() if user.status != UserStatus.deleted}
