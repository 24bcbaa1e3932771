"""The optional Docker-backed tier: the same ingestion contract against Apache Kafka in a container.

Runs only where a Docker engine answers (testcontainers); skipped otherwise with the reason.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.docker]


def docker_engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not docker_engine_answers(), reason="no Docker engine answers (`docker info` fails): the testcontainers tier needs one")
def test_ingestion_against_apache_kafka_container(stack) -> None:
    from fastapi.testclient import TestClient
    from testcontainers.kafka import KafkaContainer

    from infra.kafka import ensure_topics
    from schemas.topics import Topics
    from serving.app import create_app
    from tests.integration.test_ingestion import read_topic

    with KafkaContainer("confluentinc/cp-kafka:7.6.0") as kafka:
        settings = stack.settings.model_copy(deep=True)
        settings.kafka.bootstrap_servers = kafka.get_bootstrap_server()
        settings.kafka.topic_prefix = f"dk{uuid.uuid4().hex[:6]}."
        ensure_topics(settings)
        with TestClient(create_app(settings)) as client:
            body = {"event_id": "docker-1", "user_id": "u", "item_id": "i", "interaction_type": "view",
                    "timestamp": "2024-01-01T00:00:00Z"}
            assert client.post("/interactions", json=body).status_code == 202
        [(_, value)] = read_topic(settings, Topics.INTERACTIONS, 1)
        assert value["event_id"] == "docker-1"
