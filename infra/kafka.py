"""Kafka client configuration and idempotent topic bootstrap, shared by API, flows and tools."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.topics import ALL_TOPICS, TopicSpec
from serving.config import Settings

log = logging.getLogger(__name__)


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """A durable producer: acks from all replicas, idempotent retries, bounded delivery time."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "acks": "all",
        "enable.idempotence": False,  # tansu has no idempotent-producer support; event_id de-dups
        "linger.ms": settings.kafka.linger_ms,
        "message.timeout.ms": int(settings.kafka.produce_timeout_s * 1000),
        "socket.timeout.ms": 2000,
        "reconnect.backoff.max.ms": 1000,
    }
    config.update(extra)
    return config


def consumer_config(settings: Settings, group_id: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "group.id": group_id,
        "session.timeout.ms": settings.kafka.session_timeout_ms,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
    }
    config.update(extra)
    return config


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers, "socket.timeout.ms": 2000})


def ensure_topics(settings: Settings, specs: tuple[TopicSpec, ...] = ALL_TOPICS, timeout_s: float = 10.0) -> list[str]:
    """Create missing topics; existing ones are left alone. Returns the names created."""
    admin = admin_client(settings)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = []
    for spec in specs:
        name = settings.topic(spec)
        if name in existing:
            continue
        config = {"cleanup.policy": "compact"} if spec.compacted else {}
        wanted.append(NewTopic(name, num_partitions=spec.partitions, replication_factor=1, config=config))
    created: list[str] = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout_s).items() if wanted else []:
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            # Another process may have created it between our list and create.
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    if created:
        log.info("topics_created %s", created)
    return created


def main() -> int:
    """Create the topics on the configured broker (compose's one-shot `init-topics`)."""
    from serving.config import load_settings

    settings = load_settings()
    created = ensure_topics(settings, timeout_s=30.0)
    print(f"topics on {settings.kafka.bootstrap_servers}: created {created or 'none (all present)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
