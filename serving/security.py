"""API keys, scopes and per-key rate limits for the HTTP API.

In: the key from the ``X-API-Key`` header (or ``Authorization: Bearer``).
Out: the caller's :class:`ApiKeyRecord` on ``request.state.api_key``, or an error:
401 missing/unknown key, 403 key lacks the route's scope, 429 + Retry-After
when the key's token bucket is empty, 503 when the key store is unreachable
and the key was never seen.

Hot path: at most ONE Redis round trip per request, usually none. A Lua
script (EVALSHA) looks the key up by its hash, checks the scope and takes
tokens from the key's bucket atomically, using Redis' clock so API replicas
share one bucket. Key records are cached in-process for
``security.key_cache_ttl_s``; with a cached record the script skips the lookup
and only charges the bucket. A revoked key therefore keeps working on a
replica for at most that TTL.

Token leases: a round trip costs more than the rest of a cached
recommendation (~0.2 ms of syscalls here), so a replica takes up to
``security.rate_limit_lease_fraction`` of the key's rate at once from the
shared bucket and spends it locally for at most
``security.rate_limit_lease_s``. A key limited to 10,000 requests/s then costs
one round trip per ~200 requests; a key limited to 50/s still pays one per
request (its lease is a single token), so small limits stay exact. What a
replica over-admits is bounded by one lease; unspent tokens of an expired
lease are dropped (errs towards refusing). Unlimited keys (rate 0) with a
cached record need no round trip at all.

Only ``HMAC-SHA256(pepper, key)`` reaches Redis; the key itself is shown
once, when it is created (infra/apikeys.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from pydantic import ValidationError
from redis.exceptions import RedisError

from schemas.api import ErrorResponse
from schemas.security import ApiKeyRecord, ApiScope
from serving.config import Settings
from serving.errors import ApiError, ServiceUnavailable
from serving.metrics import AUTH_FAILURES, AUTH_STORE_ERRORS

log = logging.getLogger(__name__)

KEY_PREFIX = "rk_"  # makes leaked keys easy to recognise in logs and secret scanners


class Unauthorized(ApiError):
    status_code = 401
    error = "unauthorized"


class Forbidden(ApiError):
    status_code = 403
    error = "forbidden"


class RateLimited(ApiError):
    status_code = 429
    error = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


def new_api_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(settings: Settings, key: str) -> str:
    """The only form of a key that is stored: hex HMAC-SHA256 under the configured pepper."""
    pepper = settings.security.api_key_pepper.encode()
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def key_id_of(key_hash: str) -> str:
    """Public id of a key: a prefix of its hash (safe to log)."""
    return key_hash[:16]


# KEYS[1] key record (hash), KEYS[2] token bucket (hash)
# ARGV[1] required scope, ARGV[2] cost, ARGV[3] rate/s or "" (then read the record),
# ARGV[4] burst (with ARGV[3]), ARGV[5] lease: tokens to take at most (>= cost) when available
# Returns {code, retry_after_ms, tokens granted, record fields...};
# code 1 ok, 0 unknown, 2 forbidden, 3 limited.
_CHECK_LUA = """
local rate = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local record = {}
if not rate then
  record = redis.call('HGETALL', KEYS[1])
  if #record == 0 then return {0, 0, 0} end
  local fields = {}
  for i = 1, #record, 2 do fields[record[i]] = record[i + 1] end
  local scopes = ',' .. (fields['scopes'] or '') .. ','
  if not string.find(scopes, ',admin,', 1, true)
     and not string.find(scopes, ',' .. ARGV[1] .. ',', 1, true) then
    local out = {2, 0, 0}
    for i = 1, #record do out[#out + 1] = record[i] end
    return out
  end
  rate = tonumber(fields['rate_per_s']) or 0
  burst = tonumber(fields['burst']) or 1
end
local out = {1, 0, 0}
if rate > 0 then
  local cost = tonumber(ARGV[2])
  local lease = math.max(cost, tonumber(ARGV[5]) or cost)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local bucket = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tokens = tonumber(bucket[1]) or burst
  local ts = tonumber(bucket[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  if tokens < cost then
    out = {3, math.ceil((cost - tokens) * 1000 / rate), 0}
  else
    local granted = math.max(cost, math.min(lease, math.floor(tokens)))
    tokens = tokens - granted
    out = {1, 0, granted}
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', tostring(now))
  -- an idle bucket is full again after burst/rate seconds: let it expire then
  redis.call('PEXPIRE', KEYS[2], math.ceil(burst * 1000 / rate) + 1000)
end
for i = 1, #record do out[#out + 1] = record[i] end
return out
"""

ANONYMOUS = ApiKeyRecord(
    key_id="0" * 16, name="anonymous", scopes=[ApiScope.admin], rate_per_s=0, burst=1
)


@dataclass
class _Cached:
    record: ApiKeyRecord
    fetched_at: float


@dataclass
class _Lease:
    """Tokens taken from a key's shared bucket, spent locally until they run out or expire."""

    tokens: int
    expires_at: float


class ApiKeyAuthenticator:
    """Checks keys, scopes and rate limits; one instance per app (built in the lifespan)."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._script = redis.register_script(_CHECK_LUA)
        self._cache: dict[str, _Cached] = {}
        self._leases: dict[str, _Lease] = {}
        # key hash -> done when the lease being taken for it has come back (one refill at a time).
        self._refills: dict[str, asyncio.Future[None]] = {}
        # key -> its HMAC: hashing is the largest cost of an authentication served from the cache.
        self._hashes: dict[str, str] = {}

    def lease_size(self, record: ApiKeyRecord) -> int:
        """Tokens to take from the shared bucket at once for this key (1 = exact, no lease)."""
        fraction = self.settings.security.rate_limit_lease_fraction
        return max(1, int(min(record.burst, record.rate_per_s) * fraction))

    async def authenticate(self, key: str | None, scope: ApiScope) -> ApiKeyRecord:
        """The key's record if it may call a route needing ``scope`` now, else an ApiError."""
        security = self.settings.security
        if not security.auth_enabled:
            return ANONYMOUS
        if not key:
            AUTH_FAILURES.labels(reason="missing").inc()
            raise Unauthorized(
                f"missing API key: send it in the {API_KEY_HEADER} header "
                "(or as 'Authorization: Bearer <key>')"
            )
        key_hash = self._hashes.get(key)
        if key_hash is None:
            if len(self._hashes) >= 10_000:  # bound memory against callers sending many bad keys
                self._hashes.clear()
            key_hash = self._hashes[key] = hash_api_key(self.settings, key)
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        fresh = cached is not None and now - cached.fetched_at < security.key_cache_ttl_s
        if fresh and cached is not None:
            if not cached.record.allows(scope):
                self._forbid(cached.record, scope)
            if cached.record.rate_per_s <= 0:
                return cached.record  # unlimited: nothing to charge
            # Requests that find the lease spent while another of this key is taking a new one
            # wait for it: each taking its own cost a round trip apiece, and each reply replaced
            # the lease before it with its tokens unspent, so a concurrent burst drained the shared
            # bucket faster than it was used.
            while True:
                if self._spend_lease(key_hash, now):
                    return cached.record
                refill = self._refills.get(key_hash)
                if refill is None:
                    break
                await asyncio.shield(refill)
                now = time.monotonic()
        keys = self.settings.keys
        args: list[Any] = [scope.value, 1, "", "", 1]
        refill: asyncio.Future[None] | None = None
        if fresh and cached is not None:
            lease = self.lease_size(cached.record)
            args[2:] = [repr(cached.record.rate_per_s), cached.record.burst, lease]
            if lease > 1:
                refill = self._refills[key_hash] = asyncio.get_running_loop().create_future()
        try:
            reply = await self._script(
                keys=[keys.api_key(key_hash), keys.rate_limit(key_id_of(key_hash))], args=args
            )
        except (RedisError, OSError) as exc:
            return self._on_store_error(key_hash, cached, scope, exc)
        finally:
            if refill is not None:
                # The lease (if any) is stored below before any waiter runs: they are woken by the loop.
                del self._refills[key_hash]
                refill.set_result(None)
        code, retry_after_ms, granted, *flat = reply
        record = cached.record if fresh and cached is not None else None
        if flat:
            record = self._parse(flat)
            if security.key_cache_ttl_s > 0:
                self._cache[key_hash] = _Cached(record, now)
        if code == 0 or record is None:
            self._cache.pop(key_hash, None)
            AUTH_FAILURES.labels(reason="unknown").inc()
            raise Unauthorized("unknown or revoked API key")
        if code == 2:
            self._forbid(record, scope)
        if code == 3:
            AUTH_FAILURES.labels(reason="rate_limited").inc()
            retry_after_s = max(1, math.ceil(int(retry_after_ms) / 1000))
            raise RateLimited(
                f"rate limit of {record.rate_per_s:g} requests/s (burst {record.burst}) "
                f"exceeded for key {record.key_id}; retry after {retry_after_s} s",
                retry_after_s=retry_after_s,
            )
        if int(granted) > 1:
            self._leases[key_hash] = _Lease(int(granted) - 1, now + security.rate_limit_lease_s)
        return record

    def _spend_lease(self, key_hash: str, now: float) -> bool:
        lease = self._leases.get(key_hash)
        if lease is not None and lease.tokens > 0 and lease.expires_at > now:
            lease.tokens -= 1
            return True
        return False

    def forget(self, key_id: str) -> None:
        """Drop a key from this process's cache (after a revocation here)."""
        for key_hash in [h for h in self._cache if key_id_of(h) == key_id]:
            del self._cache[key_hash]
            self._leases.pop(key_hash, None)

    @staticmethod
    def _parse(flat: list[bytes]) -> ApiKeyRecord:
        fields = dict(zip(flat[0::2], flat[1::2], strict=True))
        try:
            return ApiKeyRecord.from_redis(fields)
        except ValidationError as exc:
            # A corrupt record must not open the door; the operator sees why.
            log.error("api_key_record_corrupt error=%s", exc.errors()[:1])
            raise Unauthorized("unknown or revoked API key") from exc

    @staticmethod
    def _forbid(record: ApiKeyRecord, scope: ApiScope) -> None:
        AUTH_FAILURES.labels(reason="forbidden").inc()
        held = ", ".join(s.value for s in record.scopes)
        raise Forbidden(f"API key {record.key_id} lacks the scope {scope.value!r} (it has: {held})")

    def _on_store_error(
        self, key_hash: str, cached: _Cached | None, scope: ApiScope, exc: Exception
    ) -> ApiKeyRecord:
        """Redis is down: a key seen recently still works (unmetered); others get 503."""
        AUTH_STORE_ERRORS.inc()
        grace = self.settings.security.redis_outage_grace_s
        if cached is not None and time.monotonic() - cached.fetched_at < grace:
            if not cached.record.allows(scope):
                self._forbid(cached.record, scope)
            log.warning("auth_store_unavailable key_id=%s action=grace error=%s",
                        cached.record.key_id, exc)
            return cached.record
        log.warning("auth_store_unavailable action=reject error=%s", exc)
        raise ServiceUnavailable("API key store unavailable; retry shortly") from exc


API_KEY_HEADER = "X-API-Key"
# How a protected operation authenticates, as OpenAPI (and /docs) show it.
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
    "HTTPBearer": {"type": "http", "scheme": "bearer"},
}


def api_key_from(headers: Mapping[str, str]) -> str | None:
    """The key from ``X-API-Key``, else from ``Authorization: Bearer <key>`` (case-insensitive headers)."""
    key = headers.get(API_KEY_HEADER)
    if not key:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        key = credentials if scheme.lower() == "bearer" else None
    return (key or "").strip() or None


def request_api_key(request: Request) -> str | None:
    """The key a request carries (see :func:`api_key_from`)."""
    return api_key_from(request.headers)


@cache  # one dependency per scope, so FastAPI runs it once per request however often it is named
def require_scope(scope: ApiScope | str) -> Any:
    """A FastAPI dependency (``Depends``) admitting keys that hold ``scope`` (or admin)."""
    needed = ApiScope(scope)

    async def check(request: Request) -> ApiKeyRecord:
        # Headers are read here rather than through FastAPI's security sub-dependencies, which
        # cost ~0.13 ms per request; document_security() puts the schemes into OpenAPI.
        key = request_api_key(request)
        authenticator: ApiKeyAuthenticator = request.app.state.authenticator
        record = await authenticator.authenticate(key, needed)
        request.state.api_key = record
        return record

    check.__name__ = f"require_{needed.name}"
    return Depends(check)


# Documented on every protected route (400 too: each takes a body or shares its router),
# so OpenAPI (and clients generated from it) know them.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body could not be decoded (not UTF-8 JSON)"},
    401: {"model": ErrorResponse, "description": "Missing, unknown or revoked API key"},
    403: {"model": ErrorResponse, "description": "The API key lacks the scope this route needs"},
    429: {
        "model": ErrorResponse,
        "description": "The key's rate limit is exhausted",
        "headers": {"Retry-After": {"description": "Seconds until a request is allowed",
                                    "schema": {"type": "integer"}}},
    },
}


def protected(scope: ApiScope | str) -> dict[str, Any]:
    """``include_router`` arguments for a router whose every route needs ``scope``."""
    return {"dependencies": [require_scope(scope)], "responses": AUTH_RESPONSES}


def document_security(app: FastAPI) -> None:
    """Add the key schemes to the app's OpenAPI, on every operation that needs a key (answers 401)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if "401" in operation.get("responses", {}):
                    operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# Typed aliases for endpoints that want the caller: `def f(caller: RecsReader): ...`
RecsReader = Annotated[ApiKeyRecord, require_scope(ApiScope.recs_read)]
EventsWriter = Annotated[ApiKeyRecord, require_scope(ApiScope.events_write)]
CatalogWriter = Annotated[ApiKeyRecord, require_scope(ApiScope.catalog_write)]
Admin = Annotated[ApiKeyRecord, require_scope(ApiScope.admin)]
