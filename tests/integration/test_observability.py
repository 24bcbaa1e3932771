"""/metrics, request ids and structured access logs, through the real app."""

from __future__ import annotations

import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from schemas.topics import Topics
from serving.app import create_app
from serving.config import Settings

pytestmark = pytest.mark.integration

EVENT = {"user_id": "u1", "item_id": "i1", "interaction_type": "click", "timestamp": "2024-05-01T12:00:00Z"}


@pytest.fixture
def client(settings: Settings, auth_headers: dict[str, str]):
    with TestClient(create_app(settings), headers=auth_headers) as client:
        yield client


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    before = scrape(client)
    assert client.post("/interactions", json=EVENT).status_code == 202
    assert client.put("/items/m-42", json={"title": "Heat"}).status_code == 200
    assert client.post("/interactions", json={**EVENT, "interaction_type": "love"}).status_code == 422
    assert client.post("/interactions", json=EVENT, headers={"X-API-Key": "rk_wrong"}).status_code == 401
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "recsys_http_requests_total"
    assert delta(requests, method="POST", route="/interactions", status="202") == 1
    assert delta(requests, method="POST", route="/interactions", status="422") == 1
    assert delta(requests, method="POST", route="/interactions", status="401") == 1
    # Ids never become label values: the template is the label.
    assert delta(requests, method="PUT", route="/items/{item_id}", status="200") == 1
    assert delta("recsys_http_request_duration_seconds_count", method="POST", route="/interactions") == 3
    assert delta("recsys_auth_failures_total", reason="unknown") == 1
    assert delta("recsys_dead_letters_total", source="api") == 1


def test_unmatched_paths_share_one_label(client: TestClient) -> None:
    for path in ("/nope/1", "/nope/2"):
        assert client.get(path).status_code == 404
    metrics = scrape(client)
    assert sample(metrics, "recsys_http_requests_total", method="GET", route="<unmatched>", status="404") >= 2
    assert not any("/nope" in str(labels) for (_, labels) in metrics)


def test_produce_errors_are_counted(settings: Settings, auth_headers: dict[str, str]) -> None:
    dead = settings.model_copy(deep=True)
    dead.kafka.bootstrap_servers = "127.0.0.1:1"
    dead.kafka.produce_timeout_s = 0.5
    with TestClient(create_app(dead), headers=auth_headers) as client:
        topic = dead.topic(Topics.INTERACTIONS)
        before = sample(scrape(client), "recsys_produce_errors_total", topic=topic)
        assert client.post("/interactions", json=EVENT).status_code == 503
        assert sample(scrape(client), "recsys_produce_errors_total", topic=topic) == before + 1


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    echoed = client.post("/interactions", json=EVENT, headers={"X-Request-ID": "req-abc.123"})
    assert echoed.headers["x-request-id"] == "req-abc.123"
    generated = client.get("/healthz")
    assert len(generated.headers["x-request-id"]) == 32
    # Unsafe ids (log injection, huge values) are replaced, not echoed.
    unsafe = client.get("/healthz", headers={"X-Request-ID": "a b\tc"})
    assert unsafe.headers["x-request-id"] != "a b\tc" and len(unsafe.headers["x-request-id"]) == 32
    too_long = client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert len(too_long.headers["x-request-id"]) == 32
    # Errors carry it too, also those refused before routing (413 body limit).
    refused = client.post("/interactions", json=EVENT, headers={"X-API-Key": "", "X-Request-ID": "r-401"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "r-401"
    huge = client.post("/interactions", content=b"x" * (client.app.state.settings.api.max_body_bytes + 1),
                       headers={"X-Request-ID": "r-413", "content-type": "application/json"})
    assert huge.status_code == 413 and huge.headers["x-request-id"] == "r-413"


def test_access_log_is_one_json_line_with_request_id_route_status_and_key(
    settings: Settings, auth_headers: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    with TestClient(create_app(settings), headers=auth_headers) as client:
        capfd.readouterr()
        client.post("/interactions", json=EVENT, headers={"X-Request-ID": "trace-7"})
    lines = [orjson.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    [access] = [entry for entry in lines if entry.get("event") == "http_request" and entry.get("request_id") == "trace-7"]
    assert access["route"] == "/interactions" and access["status"] == 202 and access["method"] == "POST"
    assert access["duration_ms"] > 0 and len(access["key_id"]) == 16
    assert access["level"] == "info" and access["ts"].endswith("+00:00")


def test_flow_lag_follows_acknowledged_events_and_what_the_flow_read(
        client: TestClient, settings: Settings, tmp_path) -> None:
    import time

    from tests.integration.test_features import FlowRunner

    def gauges() -> dict:
        return scrape(client)

    def wait_for(check, what: str) -> dict:
        deadline = time.monotonic() + 6  # both ends write their notes once a second
        while time.monotonic() < deadline:
            metrics = gauges()
            if check(metrics):
                return metrics
            time.sleep(0.3)
        raise AssertionError(f"{what}: {[(k, v) for k, v in gauges().items() if 'flow_' in k[0]]}")

    events = [{**EVENT, "user_id": f"lag{i}", "event_id": f"lag-{i}"} for i in range(5)]
    assert client.post("/interactions/batch", json={"events": events}).status_code == 202
    FlowRunner(settings, tmp_path).run()  # the features flow reads the log to its end
    caught_up = wait_for(lambda m: ("recsys_flow_lag_records", (("flow", "features"),)) in m,
                         "the features flow's progress never reached /metrics")
    assert sample(caught_up, "recsys_flow_lag_records", flow="features") == 0
    assert sample(caught_up, "recsys_flow_lag_seconds", flow="features") < 5
    assert 0 <= sample(caught_up, "recsys_feature_freshness_seconds", state="features") < 60

    # Three more acknowledged events that no flow has read: the lag counts them.
    for i in range(3):
        assert client.post("/interactions", json={**EVENT, "event_id": f"lag-late-{i}"}).status_code == 202
    behind = wait_for(lambda m: sample(m, "recsys_flow_lag_records", flow="features") == 3,
                      "three unread events never showed as lag")
    assert sample(behind, "recsys_flow_lag_seconds", flow="features") >= 0
