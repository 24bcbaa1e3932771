"""The embedded stack as a new user drives it: up, ready, ingest, load the demo data, down.

Runs `infra.stack` with its own state folder, broker and API ports (a running
`make up` stack is left alone); Redis and Milvus are shared and adopted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import orjson
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from infra.apikeys import create_key
from infra.stack import EmbeddedStack, settings_env
from schemas.topics import ALL_TOPICS
from serving.config import Settings
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def running(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    settings = stack.settings.model_copy(deep=True)
    broker_port, api_port = free_port(), free_port()
    settings.stack.state_dir = tmp_path_factory.mktemp("state")
    settings.stack.broker_listen = f"127.0.0.1:{broker_port}"
    settings.kafka.bootstrap_servers = f"127.0.0.1:{broker_port}"
    settings.api.port = api_port
    settings.redis.key_prefix = f"e2e{uuid.uuid4().hex[:8]}:"
    own = EmbeddedStack(settings)
    own.up(echo=lambda _: None)
    key, _ = create_key(settings, "e2e", ["admin"], rate_per_s=100_000, burst=100_000)
    os.environ["RECSYS_API_KEY"] = key
    yield own
    os.environ.pop("RECSYS_API_KEY", None)
    own.down(echo=lambda _: None)


def auth() -> dict[str, str]:
    return {"X-API-Key": os.environ["RECSYS_API_KEY"]}


def api_url(stack: EmbeddedStack) -> str:
    return f"http://{stack.settings.api.host}:{stack.settings.api.port}"


def read_all(settings: Settings, topic: str, expected: int, timeout_s: float = 60.0) -> list[tuple[bytes, dict]]:
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    consumer.subscribe([topic])
    out: list[tuple[bytes, dict]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for message in consumer.consume(5000, timeout=0.5):
                if message.error() is None:
                    out.append((message.key(), orjson.loads(message.value())))
        # A little longer, to catch anything published more than expected.
        for message in consumer.consume(5000, timeout=1.0):
            if message.error() is None:
                out.append((message.key(), orjson.loads(message.value())))
    finally:
        consumer.close()
    return out


def test_ready_and_topics_listed_by_a_plain_client(running: EmbeddedStack) -> None:
    response = httpx.get(f"{api_url(running)}/readyz", timeout=5)
    assert response.status_code == 200, response.text
    topics = AdminClient({"bootstrap.servers": running.settings.kafka.bootstrap_servers}).list_topics(timeout=5).topics
    assert {spec.name for spec in ALL_TOPICS} <= set(topics)


def test_posted_event_is_readable_from_the_topic_and_bad_one_is_named(running: EmbeddedStack) -> None:
    event_id = f"e2e-{uuid.uuid4().hex}"
    body = {"event_id": event_id, "user_id": "e2e-user", "item_id": "50", "interaction_type": "click",
            "timestamp": "2024-05-01T12:00:00Z"}
    assert httpx.post(f"{api_url(running)}/interactions", json=body, headers=auth(), timeout=5).status_code == 202
    bad = httpx.post(f"{api_url(running)}/interactions", json={**body, "item_id": None}, headers=auth(), timeout=5)
    assert bad.status_code == 422 and bad.json()["details"][0]["field"] == "item_id"
    found = [v for _, v in read_all(running.settings, "interactions", 1, timeout_s=20) if v["event_id"] == event_id]
    assert len(found) == 1 and found[0]["user_id"] == "e2e-user"


def test_demo_loader_counts_read_back_from_the_topics(running: EmbeddedStack) -> None:
    env = {**os.environ, **settings_env(running.settings)}
    subprocess.run([sys.executable, "-m", "demo.load", "--api", api_url(running), "--quiet", "--force", "--no-model"],
                   check=True, cwd=ROOT, env=env, timeout=300)
    settings = running.settings
    users = read_all(settings, "catalog.users", 943)
    items = read_all(settings, "catalog.items", 1682)
    interactions = read_all(settings, "interactions", 100_000)
    assert len({k for k, _ in users}) == 943
    assert len({k for k, _ in items}) == 1682
    ml = [v for _, v in interactions if v["event_id"].startswith("ml100k-")]
    assert len({v["event_id"] for v in ml}) == 100_000
    kinds = Counter(v["interaction_type"] for v in ml)
    assert set(kinds) == {"like", "watch"} and kinds["like"] == 55_375  # ratings >= 4 in ML-100K


def test_down_stops_every_process_it_started(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = stack.settings.model_copy(deep=True)
    settings.stack.state_dir = tmp_path_factory.mktemp("down")
    broker_port = free_port()
    settings.stack.broker_listen = f"127.0.0.1:{broker_port}"
    settings.kafka.bootstrap_servers = f"127.0.0.1:{broker_port}"
    settings.api.port = free_port()
    own = EmbeddedStack(settings)
    own.up(echo=lambda _: None)
    pids = own.status()
    assert {"broker", "api"} <= set(pids) and all(pids.values())
    own.down(echo=lambda _: None)
    for name, pid in pids.items():
        assert pid is not None and not process_alive(pid), f"{name} (pid {pid}) still runs"
    assert own.status() == {}


def process_alive(pid: int) -> bool:
    """Alive and not a zombie, read from /proc independently of the code under test."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
