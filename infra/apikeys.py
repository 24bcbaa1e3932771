"""Admin CLI for API keys: create (the key is printed once), revoke, list.

    python -m infra.apikeys create --name web --scopes recs:read,events:write [--rate 100 --burst 200]
    python -m infra.apikeys revoke KEY_ID
    python -m infra.apikeys list

In: settings (RECSYS_* env: Redis URL, key prefix, pepper). Out: key records
in Redis under ``RedisKeys.api_key(hash)``; only the HMAC-SHA256 hash of a
key is stored, so a lost key cannot be recovered, only replaced. A revoked
key stops working within ``security.key_cache_ttl_s`` on every API replica.

``ensure_dev_key(settings)`` gives development a working key with every scope
and writes it to ``<state_dir>/api-key`` (mode 0600), reusing it while valid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import redis

from schemas.security import ApiKeyRecord, ApiScope
from serving.config import Settings, load_settings
from serving.security import hash_api_key, key_id_of, new_api_key


class KeyNotFound(LookupError):
    """No stored key has that id."""


def _client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.url, socket_timeout=5.0)


def create_key(
    settings: Settings,
    name: str,
    scopes: Iterable[ApiScope | str],
    rate_per_s: float | None = None,
    burst: int | None = None,
) -> tuple[str, ApiKeyRecord]:
    """Store a new key's record; returns (the key, shown only now; its record)."""
    key = new_api_key()
    key_hash = hash_api_key(settings, key)
    rate = settings.security.default_rate_per_s if rate_per_s is None else rate_per_s
    record = ApiKeyRecord(
        key_id=key_id_of(key_hash),
        name=name,
        scopes=sorted({ApiScope(s) for s in scopes}, key=lambda s: s.value),
        rate_per_s=rate,
        burst=burst if burst is not None else max(settings.security.default_burst, int(rate)),
    )
    with _client(settings) as client:
        client.hset(settings.keys.api_key(key_hash), mapping=record.to_redis())
    return key, record


def _records(settings: Settings, client: redis.Redis) -> list[tuple[str, ApiKeyRecord]]:
    """(redis key, record) of every stored key under this deployment's prefix."""
    pattern = settings.keys.api_key("*")
    found = []
    for redis_key in client.scan_iter(match=pattern, count=500):
        fields = client.hgetall(redis_key)
        if fields:
            found.append((redis_key.decode(), ApiKeyRecord.from_redis(fields)))
    return sorted(found, key=lambda pair: pair[1].created_at)


def list_keys(settings: Settings) -> list[ApiKeyRecord]:
    """Every stored key's record, oldest first (no secrets: there are none stored)."""
    with _client(settings) as client:
        return [record for _, record in _records(settings, client)]


def revoke_key(settings: Settings, key_id: str) -> ApiKeyRecord:
    """Delete the key with this id (and its rate-limit bucket); KeyNotFound if none."""
    with _client(settings) as client:
        for redis_key, record in _records(settings, client):
            if record.key_id == key_id:
                client.delete(redis_key, settings.keys.rate_limit(key_id))
                return record
    raise KeyNotFound(f"no API key with id {key_id!r}")


def key_is_valid(settings: Settings, key: str) -> bool:
    """True if this key is stored (under the current pepper) with every scope."""
    with _client(settings) as client:
        fields = client.hgetall(settings.keys.api_key(hash_api_key(settings, key)))
    return bool(fields) and set(ApiKeyRecord.from_redis(fields).scopes) == set(ApiScope)


def dev_key_path(settings: Settings) -> Path:
    return Path(settings.stack.state_dir) / "api-key"


def ensure_dev_key(settings: Settings) -> str:
    """A development key with every scope, kept in <state_dir>/api-key (0600); reused while valid."""
    path = dev_key_path(settings)
    if path.exists():
        key = path.read_text().strip()
        if key and key_is_valid(settings, key):
            return key
    # The demo loader publishes thousands of catalog records through this key: no tight throttle.
    key, _ = create_key(settings, "development", list(ApiScope), rate_per_s=10_000, burst=20_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create with 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)  # an older file may have had wider permissions
    return key


def _parse_scopes(text: str) -> list[ApiScope]:
    scopes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            scopes.append(ApiScope(part))
        except ValueError:
            valid = ", ".join(s.value for s in ApiScope)
            raise argparse.ArgumentTypeError(f"unknown scope {part!r}; valid: {valid}") from None
    if not scopes:
        raise argparse.ArgumentTypeError("give at least one scope")
    return scopes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.apikeys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="who holds the key")
    create.add_argument("--scopes", required=True, type=_parse_scopes,
                        help="comma-separated: " + ",".join(s.value for s in ApiScope))
    create.add_argument("--rate", type=float, help="requests per second (0: unlimited)")
    create.add_argument("--burst", type=int, help="requests allowed at once")
    revoke = commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    commands.add_parser("list", help="list keys (ids, names, scopes, limits)")
    commands.add_parser("dev-key", help="print the development key, creating it if needed")
    args = parser.parse_args(argv)

    settings = load_settings()
    if args.command == "create":
        key, record = create_key(settings, args.name, args.scopes, args.rate, args.burst)
        print(json.dumps({"api_key": key, **record.model_dump(mode="json")}, indent=2))
        print("store the api_key now: only its hash is kept", file=sys.stderr)
    elif args.command == "revoke":
        try:
            record = revoke_key(settings, args.key_id)
        except KeyNotFound as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"revoked {record.key_id} ({record.name})")
    elif args.command == "list":
        for record in list_keys(settings):
            print(json.dumps(record.model_dump(mode="json")))
    else:
        print(ensure_dev_key(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
