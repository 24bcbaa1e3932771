"""GET /recommendations through the pure-ASGI lane answers exactly as FastAPI's route does (real Redis).

The lane (serving/routes/recommendations.GetRecommendationsLane) takes the hot
route past FastAPI's router; these tests hold it to the route's contract:
same statuses and bodies for every error, the same served list, and the
same request ids, metrics labels and impressions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from infra.apikeys import create_key
from schemas.security import ApiScope
from serving.app import create_app
from serving.config import Settings

pytestmark = pytest.mark.integration

ITEMS = [f"lane{k}" for k in range(30)]


@pytest.fixture
def cached_user(settings: Settings) -> str:
    """A user with a precomputed homepage list whose items all have feature documents."""
    r = redis.Redis.from_url(settings.redis.url)
    now = time.time()
    for k, item in enumerate(ITEMS):
        r.set(settings.keys.item_features(item), orjson.dumps(
            {"item_id": item, "status": "deleted" if k == 1 else "active", "category": f"c{k % 3}"}))
    entry = {"items": [[item, round(1 - k / 100, 6), ["source:ann"]] for k, item in enumerate(ITEMS)],
             "generated_at": "2026-11-25T00:00:00+00:00", "fresh_until": now + 600, "computed_at": now,
             "region": None, "age_bucket": None, "current_item_id": None}
    r.set(settings.keys.recommendations("lane-user", "homepage"), orjson.dumps(entry), ex=600)
    r.close()
    return "lane-user"


@pytest.fixture
def clients(settings: Settings) -> Iterator[dict[bool, TestClient]]:
    """Two apps on the same stores: the lane on (the default) and off (FastAPI's route)."""
    off = settings.model_copy(deep=True)
    off.api.get_recommendations_lane = False
    with TestClient(create_app(settings)) as lane, TestClient(create_app(off)) as route:
        yield {True: lane, False: route}


def _reader(settings: Settings) -> dict[str, str]:
    key, _ = create_key(settings, "lane-reader", [ApiScope.recs_read])
    return {"X-API-Key": key}


def test_errors_are_identical_with_and_without_the_lane(clients: dict[bool, TestClient], settings: Settings,
                                                        cached_user: str) -> None:
    reader = _reader(settings)
    writer, _ = create_key(settings, "lane-writer", [ApiScope.events_write])
    cases = [
        ("/recommendations?user_id=u1", {}),                                    # no key
        ("/recommendations?user_id=u1", {"X-API-Key": "rk_not-a-real-key"}),   # unknown key
        ("/recommendations?user_id=u1", {"X-API-Key": writer}),                # wrong scope
        ("/recommendations", reader),                                           # user_id missing
        ("/recommendations?user_id=u1&limit=0", reader),
        ("/recommendations?user_id=u1&limit=ten", reader),
        ("/recommendations?user_id=u1&surface=sidebar", reader),
        ("/recommendations?user_id=u1&device=fridge", reader),
        ("/recommendations?user_id=%20&surface=homepage", reader),
    ]
    for path, headers in cases:
        lane, route = (clients[on].get(path, headers=headers) for on in (True, False))
        assert lane.status_code == route.status_code, (path, lane.text, route.text)
        assert lane.status_code in (401, 403, 422), (path, lane.text)
        assert lane.json() == route.json(), path
        assert lane.headers["content-type"] == route.headers["content-type"]


def test_the_served_list_is_the_routes(clients: dict[bool, TestClient], settings: Settings, cached_user: str) -> None:
    headers = {**_reader(settings), "X-Request-ID": "lane-check-1"}
    path = f"/recommendations?user_id={cached_user}&surface=homepage&limit=5"
    lane, route = (clients[on].get(path, headers=headers) for on in (True, False))
    assert lane.status_code == route.status_code == 200, lane.text
    assert lane.headers["x-request-id"] == "lane-check-1"
    body, expected = lane.json(), route.json()
    for varying in ("generated_at",):
        body.pop(varying), expected.pop(varying)
    assert body == expected
    assert body["served_from"] == "cache" and body["request_id"] == "lane-check-1"
    # The deleted item (lane1) is filtered on the cached path; the page is the cached order otherwise.
    assert [r["item_id"] for r in body["recommendations"]] == ["lane0", "lane2", "lane3", "lane4", "lane5"]


def test_metrics_and_access_labels_name_the_route(clients: dict[bool, TestClient], settings: Settings,
                                                  cached_user: str) -> None:
    headers = _reader(settings)
    client = clients[True]

    def served(route: str, status: str) -> float:
        # The registry is per process (other tests count too): compare before and after.
        labels = {"method": "GET", "route": route, "status": status}
        return REGISTRY.get_sample_value("recsys_http_requests_total", labels) or 0.0

    before = {(r, s): served(r, s) for r in ("/recommendations", "<unmatched>") for s in ("200", "422")}
    assert client.get(f"/recommendations?user_id={cached_user}", headers=headers).status_code == 200
    assert client.get("/recommendations?user_id=u1&limit=0", headers=headers).status_code == 422
    after = {key: served(*key) for key in before}
    assert after[("/recommendations", "200")] - before[("/recommendations", "200")] == 1
    assert after[("/recommendations", "422")] - before[("/recommendations", "422")] == 1
    assert after[("<unmatched>", "200")] == before[("<unmatched>", "200")]
    assert after[("<unmatched>", "422")] == before[("<unmatched>", "422")]
    assert 'route="/recommendations",status="200"' in client.get("/metrics").text


def test_other_routes_and_methods_pass_through(clients: dict[bool, TestClient], settings: Settings,
                                               cached_user: str) -> None:
    headers = _reader(settings)
    client = clients[True]
    cached = client.get(f"/recommendations/cached?user_id={cached_user}", headers=headers)
    assert cached.status_code == 200 and cached.json()["recommendations"][:2] == ["lane0", "lane1"]
    posted = client.post("/recommendations", json={"user_id": cached_user, "limit": 3}, headers=headers)
    assert posted.status_code == 200 and posted.json()["served_from"] == "cache"
    assert client.delete("/recommendations", headers=headers).status_code == 405
