"""API keys, scopes and rate limits against the real Redis (and broker behind the routes)."""

from __future__ import annotations

import time

import pytest
import redis
from fastapi.testclient import TestClient

from infra.apikeys import create_key, ensure_dev_key, list_keys, main, revoke_key
from schemas.security import ApiScope
from serving.app import create_app
from serving.config import Settings

pytestmark = pytest.mark.integration

EVENT = {"user_id": "u1", "item_id": "i1", "interaction_type": "click", "timestamp": "2024-05-01T12:00:00Z"}


@pytest.fixture
def client(settings: Settings):
    with TestClient(create_app(settings)) as client:
        yield client


def test_missing_key_gets_401_naming_the_header(client: TestClient) -> None:
    response = client.post("/interactions", json=EVENT)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert "X-API-Key" in response.json()["message"]


def test_unknown_key_gets_401(client: TestClient) -> None:
    response = client.put("/items/m1", json={"title": "Heat"}, headers={"X-API-Key": "rk_not-a-real-key"})
    assert response.status_code == 401
    assert "unknown or revoked" in response.json()["message"]


def test_bearer_token_is_accepted(client: TestClient, api_key: str) -> None:
    response = client.post("/interactions", json=EVENT, headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 202


def test_wrong_scope_gets_403_naming_the_scope(client: TestClient, settings: Settings) -> None:
    key, record = create_key(settings, "reader", [ApiScope.recs_read])
    response = client.post("/interactions", json=EVENT, headers={"X-API-Key": key})
    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "forbidden" and "'events:write'" in body["message"]
    assert record.key_id in body["message"]
    # A key scoped for events cannot write the catalogue either.
    writer, _ = create_key(settings, "writer", [ApiScope.events_write])
    assert client.post("/interactions", json=EVENT, headers={"X-API-Key": writer}).status_code == 202
    assert client.put("/items/m1", json={"title": "Heat"}, headers={"X-API-Key": writer}).status_code == 403


def test_rate_limit_answers_429_with_retry_after_then_recovers(client: TestClient, settings: Settings) -> None:
    key, _ = create_key(settings, "slow", [ApiScope.events_write], rate_per_s=1, burst=2)
    headers = {"X-API-Key": key}
    codes = [client.post("/interactions", json=EVENT, headers=headers).status_code for _ in range(2)]
    assert codes == [202, 202]
    limited = client.post("/interactions", json=EVENT, headers=headers)
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited" and "1 requests/s" in limited.json()["message"]
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 2
    time.sleep(retry_after)
    assert client.post("/interactions", json=EVENT, headers=headers).status_code == 202


def test_rate_limit_is_per_key(client: TestClient, settings: Settings, api_key: str) -> None:
    slow, _ = create_key(settings, "slow", [ApiScope.events_write], rate_per_s=0.1, burst=1)
    assert client.post("/interactions", json=EVENT, headers={"X-API-Key": slow}).status_code == 202
    assert client.post("/interactions", json=EVENT, headers={"X-API-Key": slow}).status_code == 429
    assert client.post("/interactions", json=EVENT, headers={"X-API-Key": api_key}).status_code == 202


def test_revoked_key_gets_401(settings: Settings) -> None:
    settings.security.key_cache_ttl_s = 0
    key, record = create_key(settings, "leaked", [ApiScope.events_write])
    with TestClient(create_app(settings), headers={"X-API-Key": key}) as client:
        assert client.post("/interactions", json=EVENT).status_code == 202
        revoke_key(settings, record.key_id)
        response = client.post("/interactions", json=EVENT)
    assert response.status_code == 401


def test_revocation_takes_effect_within_the_cache_ttl(settings: Settings) -> None:
    settings.security.key_cache_ttl_s = 0.5
    key, record = create_key(settings, "leaked", [ApiScope.events_write])
    with TestClient(create_app(settings), headers={"X-API-Key": key}) as client:
        assert client.post("/interactions", json=EVENT).status_code == 202
        revoke_key(settings, record.key_id)
        time.sleep(0.6)
        assert client.post("/interactions", json=EVENT).status_code == 401


def test_redis_holds_only_hashes_of_keys(settings: Settings, api_key: str, client: TestClient) -> None:
    client.post("/interactions", json=EVENT, headers={"X-API-Key": api_key})  # also creates the bucket
    r = redis.Redis.from_url(settings.redis.url)
    names = list(r.scan_iter(match=settings.redis.key_prefix + "*"))
    assert names, "the key record should be stored under the test prefix"
    for name in names:
        assert api_key.encode() not in name
        values = r.hgetall(name) if r.type(name) == b"hash" else {b"": r.dump(name) or b""}
        assert all(api_key.encode() not in v for v in values.values())


def test_open_routes_need_no_key(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)


def test_auth_can_be_disabled_for_local_experiments(settings: Settings) -> None:
    settings.security.auth_enabled = False
    with TestClient(create_app(settings)) as client:
        assert client.post("/interactions", json=EVENT).status_code == 202


def test_dev_key_file_is_private_reused_and_has_every_scope(settings: Settings, tmp_path) -> None:
    settings.stack.state_dir = tmp_path
    key = ensure_dev_key(settings)
    path = tmp_path / "api-key"
    assert path.read_text().strip() == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_dev_key(settings) == key  # still valid: reused
    [record] = list_keys(settings)
    assert set(record.scopes) == set(ApiScope)
    revoke_key(settings, record.key_id)
    assert ensure_dev_key(settings) != key  # revoked: replaced


def test_cli_creates_lists_and_revokes(settings: Settings, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RECSYS_REDIS__KEY_PREFIX", settings.redis.key_prefix)
    assert main(["create", "--name", "web", "--scopes", "recs:read,events:write", "--rate", "5"]) == 0
    created = capsys.readouterr().out
    [record] = list_keys(settings)
    assert record.name == "web" and record.rate_per_s == 5
    assert record.key_id in created and '"api_key": "rk_' in created
    assert main(["list"]) == 0 and record.key_id in capsys.readouterr().out
    assert main(["revoke", record.key_id]) == 0
    assert list_keys(settings) == []
    assert main(["revoke", record.key_id]) == 1
    with pytest.raises(SystemExit):
        main(["create", "--name", "x", "--scopes", "recs:write"])


def test_admin_manages_keys_over_http(settings: Settings, api_key: str) -> None:
    settings.security.key_cache_ttl_s = 60  # revocation through the API must not wait for the cache
    admin = {"X-API-Key": api_key}
    with TestClient(create_app(settings)) as client:
        created = client.post("/admin/keys", json={"name": "mobile", "scopes": ["events:write"], "rate_per_s": 5},
                              headers=admin)
        assert created.status_code == 201
        body = created.json()
        new_key, key_id = body["api_key"], body["key_id"]
        assert body["scopes"] == ["events:write"] and body["rate_per_s"] == 5
        assert client.post("/interactions", json=EVENT, headers={"X-API-Key": new_key}).status_code == 202
        listed = client.get("/admin/keys", headers=admin).json()["keys"]
        assert key_id in {k["key_id"] for k in listed} and all("api_key" not in k for k in listed)
        # Key management needs admin: the new key cannot manage keys.
        assert client.get("/admin/keys", headers={"X-API-Key": new_key}).status_code == 403
        assert client.delete(f"/admin/keys/{key_id}", headers=admin).json()["name"] == "mobile"
        assert client.post("/interactions", json=EVENT, headers={"X-API-Key": new_key}).status_code == 401
        missing = client.delete(f"/admin/keys/{key_id}", headers=admin)
        assert missing.status_code == 404 and key_id in missing.json()["message"]
        bad = client.post("/admin/keys", json={"name": "x", "scopes": ["recs:write"]}, headers=admin)
        assert bad.status_code == 422 and bad.json()["details"][0]["field"].startswith("scopes")


def _admit(settings: Settings, key: str, n: int, concurrently: bool = False) -> tuple[int, float, int]:
    """Ask one authenticator ``n`` times: (admitted, seconds taken, Redis script calls).

    In a row, or ``concurrently`` (one request first, so the key's record is cached, then the
    other ``n - 1`` at once, as a burst on a busy worker finds them).
    """
    import asyncio

    import redis.asyncio as aioredis

    from serving.security import ApiKeyAuthenticator, RateLimited

    async def run() -> tuple[int, float, int]:
        client = aioredis.Redis.from_url(settings.redis.url)
        auth = ApiKeyAuthenticator(settings, client)
        script, calls = auth._script, 0

        async def counted(**kwargs):  # the real script, counted
            nonlocal calls
            calls += 1
            return await script(**kwargs)

        auth._script = counted
        admitted, started = 0, time.monotonic()

        async def one() -> None:
            nonlocal admitted
            try:
                await auth.authenticate(key, ApiScope.recs_read)
                admitted += 1
            except RateLimited:
                pass

        if concurrently:
            await one()
            await asyncio.gather(*(one() for _ in range(n - 1)))
        else:
            for _ in range(n):
                await one()
        elapsed = time.monotonic() - started
        await client.aclose()
        return admitted, elapsed, calls

    return asyncio.run(run())


def test_token_lease_spares_round_trips_but_the_shared_bucket_still_holds(settings: Settings) -> None:
    settings.security.rate_limit_lease_fraction = 0.02
    key, _ = create_key(settings, "fast", [ApiScope.recs_read], rate_per_s=500, burst=500)
    # Well inside the burst: the first request reads the record, then leases of 10 tokens (2%).
    admitted, _, calls = _admit(settings, key, 100)
    assert admitted == 100
    assert calls <= 1 + 100 // 10 + 1
    # Far over the limit: leases come out of the one shared bucket, so what is admitted is
    # bounded by the ~400 tokens left, the refill while asking and one lease per authenticator.
    admitted, elapsed, _ = _admit(settings, key, 1_500)
    assert admitted < 1_500
    assert admitted <= 400 + 500 * elapsed + 10 + 1


def test_small_limits_stay_exact_under_leases(settings: Settings) -> None:
    settings.security.rate_limit_lease_fraction = 0.02
    key, _ = create_key(settings, "small", [ApiScope.recs_read], rate_per_s=0.5, burst=5)
    admitted, _, calls = _admit(settings, key, 20)
    assert admitted == 5  # 2% of 0.5/s is under two tokens: no lease, every request is charged
    assert calls == 20


def test_a_concurrent_burst_shares_one_lease_at_a_time(settings: Settings) -> None:
    settings.security.rate_limit_lease_fraction = 0.02
    roomy, _ = create_key(settings, "roomy", [ApiScope.recs_read], rate_per_s=1000, burst=1000)
    # 200 requests at once, leases of 20 tokens: about one round trip per lease, not one each.
    admitted, _, calls = _admit(settings, roomy, 200, concurrently=True)
    assert admitted == 200
    assert calls <= 1 + 200 // 20 + 2
    # Over the limit at once: what is admitted is what the bucket held (100) and its refill,
    # not less: no lease is thrown away while it still holds tokens.
    tight, _ = create_key(settings, "tight", [ApiScope.recs_read], rate_per_s=100, burst=100)
    admitted, elapsed, _ = _admit(settings, tight, 300, concurrently=True)
    assert 98 <= admitted <= 100 + 100 * elapsed + 2
