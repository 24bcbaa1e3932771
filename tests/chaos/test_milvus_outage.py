"""Milvus unreachable (from start-up on): the other candidate sources answer, nothing 5xx.

The shared Milvus server is never stopped; this API is pointed at a port where
nothing listens, which is what a client sees when the server is down.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.config import Settings
from tests.chaos.conftest import ReliabilityReport, event, event_ids_in_log

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

REQUESTS = 20


def test_milvus_down_recommendations_still_answer(
    settings: Settings, auth_headers: dict[str, str], reliability: ReliabilityReport
) -> None:
    settings.milvus.uri = "http://127.0.0.1:1"
    settings.milvus.health_url = "http://127.0.0.1:1/healthz"
    settings.milvus.timeout_s = 0.5
    scenario = reliability.scenario("milvus_down", "Milvus unreachable for the API's whole life")
    phase = scenario.phase("outage")
    with TestClient(create_app(settings), headers=auth_headers) as client:
        if "/recommendations" not in client.app.openapi()["paths"]:  # type: ignore[attr-defined]
            pytest.skip("no /recommendations route in this build")
        for i in range(REQUESTS):
            body = event("milvus", i)
            began = time.perf_counter()
            response = client.post("/interactions", json=body)
            phase.record("POST /interactions", response.status_code, time.perf_counter() - began)
            if response.status_code == 202:
                phase.acked_event_ids.append(body["event_id"])
            began = time.perf_counter()
            recs = client.get("/recommendations", params={"user_id": body["user_id"], "limit": 10})
            phase.record("GET /recommendations", recs.status_code, time.perf_counter() - began)
            assert recs.status_code == 200, recs.text
            assert recs.json()["request_id"] == recs.headers["x-request-id"]
        ready = client.get("/readyz")
    assert phase.by_status == {"POST /interactions 202": REQUESTS, "GET /recommendations 200": REQUESTS}
    assert ready.status_code == 503 and ready.json()["dependencies"]["milvus"] == "down"
    # Bounded by the stage budgets, not by Milvus' connect timeout.
    assert phase.max_latency_s < 2.0, phase.max_latency_s
    acked = scenario.acked
    found = event_ids_in_log(settings, acked)
    scenario.events_found_in_log = len(acked & found)
    scenario.acknowledged_but_lost = len(acked - found)
    assert acked <= found
