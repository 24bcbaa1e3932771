"""POST /interactions and the catalog routes against the real broker."""

from __future__ import annotations

import uuid

import orjson
import pytest
from confluent_kafka import Consumer
from fastapi.testclient import TestClient

from infra.kafka import consumer_config
from schemas.topics import Topics, TopicSpec
from serving.app import create_app
from serving.config import Settings

pytestmark = pytest.mark.integration


def read_topic(settings: Settings, spec: TopicSpec, expected: int, timeout_s: float = 15.0) -> list[tuple[bytes | None, dict]]:
    """Read ``expected`` records from a topic with a plain confluent-kafka consumer."""
    import time

    consumer = Consumer(consumer_config(settings, f"reader-{uuid.uuid4().hex}"))
    consumer.subscribe([settings.topic(spec)])
    records: list[tuple[bytes | None, dict]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=0.5):
                if message.error() is None:
                    records.append((message.key(), orjson.loads(message.value())))
    finally:
        consumer.close()
    return records


@pytest.fixture
def client(settings: Settings, auth_headers: dict[str, str]):
    with TestClient(create_app(settings), headers=auth_headers) as client:
        yield client


def event(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"user_id": "u1", "item_id": "i1", "interaction_type": "like", "timestamp": "2024-05-01T12:00:00Z"}
    body.update(overrides)
    return body


def test_accepted_event_is_in_the_log_keyed_by_user(client: TestClient, settings: Settings) -> None:
    response = client.post("/interactions", json=event(event_id="evt-1", interaction_value=3.5))
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "accepted": 1, "event_ids": ["evt-1"]}
    [(key, value)] = read_topic(settings, Topics.INTERACTIONS, 1)
    assert key == b"u1"
    assert value["event_id"] == "evt-1" and value["interaction_value"] == 3.5


def test_server_assigns_event_id_when_missing(client: TestClient) -> None:
    response = client.post("/interactions", json=event())
    assert response.status_code == 202
    assert len(response.json()["event_ids"][0]) == 32


def test_batch_is_accepted_whole(client: TestClient, settings: Settings) -> None:
    events = [event(event_id=f"b{i}", user_id=f"u{i % 7}") for i in range(250)]
    response = client.post("/interactions/batch", json={"events": events})
    assert response.status_code == 202 and response.json()["accepted"] == 250
    records = read_topic(settings, Topics.INTERACTIONS, 250)
    assert sorted(v["event_id"] for _, v in records) == sorted(f"b{i}" for i in range(250))


def test_invalid_event_names_the_field_and_goes_to_dead_letter(client: TestClient, settings: Settings) -> None:
    response = client.post("/interactions", json=event(interaction_type="love"))
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "validation_error"
    assert body["details"][0]["field"] == "interaction_type"
    [(_, letter)] = read_topic(settings, Topics.DEAD_LETTER, 1)
    assert letter["source"] == "api" and "interaction_type" in letter["reason"]
    assert "love" in letter["payload"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"timestamp": "2024-05-01T12:00:00"}, "timestamp"),
        ({"interaction_value": -1}, "interaction_value"),
        ({"surface": "sidebar"}, "surface"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_each_bad_field_is_named(client: TestClient, overrides: dict[str, object], field: str) -> None:
    response = client.post("/interactions", json=event(**overrides))
    assert response.status_code == 422
    assert field in {d["field"] for d in response.json()["details"]}


def test_batch_field_path_points_at_the_bad_event(client: TestClient) -> None:
    response = client.post("/interactions/batch", json={"events": [event(), event(item_id=None)]})
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "events[1].item_id"


def test_oversized_batch_gets_413(client: TestClient, settings: Settings) -> None:
    events = [event(event_id=f"x{i}") for i in range(settings.api.max_batch_events + 1)]
    response = client.post("/interactions/batch", json={"events": events})
    assert response.status_code == 413
    assert "limit" in response.json()["message"]


def test_oversized_body_gets_413(client: TestClient, settings: Settings) -> None:
    response = client.post("/interactions", content=b"{" + b" " * (settings.api.max_body_bytes + 1) + b"}",
                           headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_catalog_routes_publish_explicit_records(client: TestClient, settings: Settings) -> None:
    assert client.put("/users/u9", json={"language": "en", "region": "us-west", "preferences": {"categories": ["Drama"]}}).json() == {"status": "updated"}
    assert client.put("/items/m1", json={"title": "Heat", "category": "Crime", "tags": ["Crime", "Thriller"]}).status_code == 200
    assert client.delete("/items/m1").json() == {"status": "deleted"}
    [(ukey, user)] = read_topic(settings, Topics.CATALOG_USERS, 1)
    assert ukey == b"u9" and user["preferences"] == {"categories": ["Drama"]} and user["region"] == "us-west"
    items = read_topic(settings, Topics.CATALOG_ITEMS, 2)
    assert [v["status"] for _, v in items] == ["active", "deleted"]
    assert all(k == b"m1" for k, _ in items)


def test_broker_down_answers_503_and_acknowledges_nothing(stack, settings: Settings, auth_headers: dict[str, str]) -> None:
    """No acknowledged event may be lost: with the broker gone, nothing is acknowledged."""
    dead = settings.model_copy(deep=True)
    dead.kafka.bootstrap_servers = "127.0.0.1:1"  # nothing listens there
    dead.kafka.produce_timeout_s = 1.0
    with TestClient(create_app(dead), headers=auth_headers) as client:
        response = client.post("/interactions", json=event())
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert "nothing was accepted" in response.json()["message"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["dependencies"]["broker"] == "down"


def test_readyz_reports_ready_on_the_real_stack(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.json()
    assert response.json()["dependencies"] == {"broker": "up", "redis": "up", "milvus": "up"}
