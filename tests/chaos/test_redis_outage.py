"""Redis killed (-9) while the API serves and ingests: degrade, never 5xx, lose no acknowledged event.

The API runs on a Redis of its own (started here) so the shared one is untouched.
During the outage: keys seen before keep working (unmetered, within
security.redis_outage_grace_s), unknown keys get 503 with a message, events are
still acknowledged into the log, recommendations answer from a fallback and
/readyz names Redis. After a restart everything is back, rate limits included.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from infra.apikeys import create_key
from schemas.security import ApiScope
from serving.app import create_app
from serving.config import Settings
from tests.chaos.conftest import OwnRedis, Phase, ReliabilityReport, event, event_ids_in_log

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

EVENTS_PER_PHASE = 25
# A request may wait for one Redis timeout per call it makes; far below any client timeout.
MAX_LATENCY_S = 2.0


def has_route(client: TestClient, path: str) -> bool:
    return path in client.app.openapi()["paths"]  # type: ignore[attr-defined]


def exercise(client: TestClient, phase: Phase, start: int, key: str) -> None:
    """Ingest events and ask for recommendations, recording what a client sees."""
    for i in range(start, start + EVENTS_PER_PHASE):
        body = event("redis", i)
        began = time.perf_counter()
        response = client.post("/interactions", json=body, headers={"X-API-Key": key})
        phase.record("POST /interactions", response.status_code, time.perf_counter() - began)
        if response.status_code == 202:
            phase.acked_event_ids.append(body["event_id"])
        if has_route(client, "/recommendations") and i % 5 == 0:
            began = time.perf_counter()
            recs = client.get("/recommendations", params={"user_id": body["user_id"]},
                              headers={"X-API-Key": key})
            phase.record("GET /recommendations", recs.status_code, time.perf_counter() - began)


def test_redis_killed_while_serving(settings: Settings, own_redis: OwnRedis,
                                    reliability: ReliabilityReport) -> None:
    settings.redis.url = own_redis.url
    settings.security.key_cache_ttl_s = 0.2  # so the outage is met on the Redis path, not the cache
    key, _ = create_key(settings, "chaos", [ApiScope.events_write, ApiScope.recs_read], rate_per_s=0)
    scenario = reliability.scenario("redis_killed", "redis-server kill -9 while serving and ingesting, then restarted")

    with TestClient(create_app(settings)) as client:
        healthy = scenario.phase("healthy")
        exercise(client, healthy, 0, key)
        assert set(healthy.by_status) <= {"POST /interactions 202", "GET /recommendations 200"}, healthy.by_status

        own_redis.kill()
        time.sleep(0.3)  # let the cached key record expire: the next checks must reach (dead) Redis
        outage = scenario.phase("outage")
        exercise(client, outage, 1000, key)
        unknown = client.post("/interactions", json=event("redis", 9999), headers={"X-API-Key": "rk_unknown"})
        outage.record("POST /interactions (unknown key)", unknown.status_code, 0.0)
        ready = client.get("/readyz")

        own_redis.start()
        recovered = scenario.phase("recovered")
        exercise(client, recovered, 2000, key)
        ready_after = client.get("/readyz")

    # During the outage: no 5xx but the honest 503 for a key that cannot be checked.
    assert not any(code.endswith(("500", "502", "504")) for code in outage.by_status), outage.by_status
    assert outage.by_status["POST /interactions 202"] == EVENTS_PER_PHASE, outage.by_status
    assert unknown.status_code == 503 and "key store unavailable" in unknown.json()["message"]
    assert ready.status_code == 503 and ready.json()["dependencies"]["redis"] == "down"
    assert outage.max_latency_s < MAX_LATENCY_S
    if any(k.startswith("GET /recommendations") for k in outage.by_status):
        assert outage.by_status["GET /recommendations 200"] == EVENTS_PER_PHASE // 5
    # After the restart (append-only file kept the key record) all is as before.
    assert set(recovered.by_status) <= {"POST /interactions 202", "GET /recommendations 200"}
    assert ready_after.json()["dependencies"]["redis"] == "up"

    acked = scenario.acked
    found = event_ids_in_log(settings, acked)
    scenario.events_found_in_log = len(acked & found)
    scenario.acknowledged_but_lost = len(acked - found)
    assert acked <= found, f"{len(acked - found)} acknowledged events missing from the log"
