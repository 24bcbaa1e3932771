"""Kafka topic names and partition counts.

Interactions are keyed by ``user_id`` so one user's events stay ordered in one
partition and a flow worker owns that user's state; catalog topics are keyed by
the entity id. Partition counts bound how far a flow scales out.
"""

from __future__ import annotations

from typing import NamedTuple


class TopicSpec(NamedTuple):
    name: str
    partitions: int
    compacted: bool = False


class Topics:
    INTERACTIONS = TopicSpec("interactions", 6)
    IMPRESSIONS = TopicSpec("impressions", 3)
    CATALOG_ITEMS = TopicSpec("catalog.items", 3, compacted=True)
    CATALOG_USERS = TopicSpec("catalog.users", 3, compacted=True)
    CONTROL = TopicSpec("control", 1)
    DEAD_LETTER = TopicSpec("dead-letter", 1)


ALL_TOPICS: tuple[TopicSpec, ...] = (
    Topics.INTERACTIONS,
    Topics.IMPRESSIONS,
    Topics.CATALOG_ITEMS,
    Topics.CATALOG_USERS,
    Topics.CONTROL,
    Topics.DEAD_LETTER,
)


def topic_name(spec: TopicSpec, prefix: str = "") -> str:
    """The physical topic name; a prefix isolates tenants and test runs on one broker."""
    return f"{prefix}{spec.name}"
