"""The broker killed (-9) while the API ingests and serves, in the durable embedded mode.

A broker of our own (tansu on s3:// storage, an s3rver object store; infra/durable.py)
so the session broker is untouched. Clients must see: 202 only for events that
are in the log, a fast 503 + Retry-After while the broker is down (nothing
acknowledged), recommendations answering throughout, and ingestion resuming by
itself after the restart. Afterwards every acknowledged event is in the log.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from infra.durable import DurableBroker, s3rver_binary
from infra.kafka import ensure_topics
from infra.stack import StackError
from serving.app import create_app
from serving.config import Settings
from tests.chaos.conftest import Phase, ReliabilityReport, event, event_ids_in_log
from tests.conftest import free_port

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

EVENTS_PER_PHASE = 30
OUTAGE_REQUESTS = 5
RECOVERY_DEADLINE_S = 20.0


@pytest.fixture
def durable(settings: Settings, tmp_path: Path) -> Iterator[tuple[DurableBroker, Settings]]:
    try:
        s3rver_binary()
    except (StackError, OSError) as exc:
        pytest.skip(f"durable mode unavailable here: {exc}")
    port = free_port()
    own = settings.model_copy(deep=True)
    own.kafka.bootstrap_servers = f"127.0.0.1:{port}"
    own.kafka.produce_timeout_s = 1.0
    own.stack.broker_listen = f"127.0.0.1:{port}"
    own.stack.state_dir = tmp_path
    own.kafka.topic_prefix = f"d{uuid.uuid4().hex[:8]}."
    broker = DurableBroker(own, s3_port=free_port())
    broker.up()
    ensure_topics(own)
    yield broker, own
    broker.down()


def post_events(client: TestClient, phase: Phase, start: int, count: int) -> None:
    for i in range(start, start + count):
        body = event("broker", i)
        began = time.perf_counter()
        response = client.post("/interactions", json=body)
        phase.record("POST /interactions", response.status_code, time.perf_counter() - began)
        if response.status_code == 202:
            phase.acked_event_ids.append(body["event_id"])
        elif response.status_code == 503:
            assert response.headers["retry-after"].isdigit()
            assert "nothing was accepted" in response.json()["message"]


def ask_recommendations(client: TestClient, phase: Phase, count: int = 5) -> None:
    if "/recommendations" not in client.app.openapi()["paths"]:  # type: ignore[attr-defined]
        return
    for i in range(count):
        began = time.perf_counter()
        response = client.get("/recommendations", params={"user_id": f"u{i}"})
        phase.record("GET /recommendations", response.status_code, time.perf_counter() - began)


def test_broker_killed_loses_no_acknowledged_event(
    durable: tuple[DurableBroker, Settings], auth_headers: dict[str, str], reliability: ReliabilityReport
) -> None:
    broker, settings = durable
    scenario = reliability.scenario(
        "broker_killed_durable", "tansu (s3:// storage) kill -9 while ingesting and serving, then restarted")
    with TestClient(create_app(settings), headers=auth_headers) as client:
        healthy = scenario.phase("healthy")
        post_events(client, healthy, 0, EVENTS_PER_PHASE)
        ask_recommendations(client, healthy)
        assert healthy.by_status["POST /interactions 202"] == EVENTS_PER_PHASE, healthy.by_status

        broker.stop_broker(kill=True)
        outage = scenario.phase("outage")
        post_events(client, outage, 1000, OUTAGE_REQUESTS)
        ask_recommendations(client, outage)

        broker.restart_broker(kill=False)
        recovered = scenario.phase("recovered")
        began = time.monotonic()
        i = 2000
        while not recovered.acked_event_ids and time.monotonic() - began < RECOVERY_DEADLINE_S:
            post_events(client, recovered, i, 1)
            i += 1
            time.sleep(0.2)
        recovery_s = time.monotonic() - began
        post_events(client, recovered, 3000, EVENTS_PER_PHASE)
        scenario.notes.append(f"ingestion answered 202 again {recovery_s:.1f} s after the broker restart")

    assert outage.by_status["POST /interactions 503"] == OUTAGE_REQUESTS, outage.by_status
    # Fail fast: at most the produce timeout (1 s) plus scheduling, never a hung client.
    assert outage.max_latency_s < settings.kafka.produce_timeout_s + 1.5
    assert not any(k.startswith("GET /recommendations 5") for k in outage.by_status), outage.by_status
    assert recovered.by_status["POST /interactions 202"] >= EVENTS_PER_PHASE, recovered.by_status

    acked = scenario.acked
    found = event_ids_in_log(settings, acked)
    scenario.events_found_in_log = len(acked & found)
    scenario.acknowledged_but_lost = len(acked - found)
    assert acked <= found, f"{len(acked - found)} acknowledged events were lost by the broker restart"
