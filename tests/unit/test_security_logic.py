"""Pure logic of security and logging: settings guards, key hashing, records, log lines."""

from __future__ import annotations

import logging

import orjson
import pytest
from pydantic import ValidationError

from schemas.security import ApiKeyRecord, ApiScope
from serving.config import DEV_API_KEY_PEPPER, Settings
from serving.logging import JsonFormatter, log_event
from serving.security import hash_api_key, key_id_of, new_api_key

PROD_KAFKA = {"bootstrap_servers": "kafka:9092"}


def settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[arg-type]


def test_production_refuses_the_default_pepper() -> None:
    with pytest.raises(ValidationError, match="API_KEY_PEPPER"):
        settings(environment="production", kafka=PROD_KAFKA)


def test_production_refuses_auth_disabled() -> None:
    with pytest.raises(ValidationError, match="AUTH_ENABLED"):
        settings(environment="production", kafka=PROD_KAFKA,
                 security={"api_key_pepper": "x" * 32, "auth_enabled": False})


def test_production_refuses_a_short_pepper() -> None:
    with pytest.raises(ValidationError, match="at least 16"):
        settings(environment="production", kafka=PROD_KAFKA, security={"api_key_pepper": "short"})


def test_production_starts_with_a_real_pepper_and_development_with_the_default() -> None:
    assert settings(environment="production", kafka=PROD_KAFKA,
                    security={"api_key_pepper": "p" * 32}).security.auth_enabled
    assert settings(environment="development").security.api_key_pepper == DEV_API_KEY_PEPPER


def test_hash_depends_on_the_pepper_and_never_contains_the_key() -> None:
    key = new_api_key()
    a = hash_api_key(settings(), key)
    b = hash_api_key(settings(security={"api_key_pepper": "another-pepper-value"}), key)
    assert a != b and len(a) == 64 and key not in a
    assert key_id_of(a) == a[:16]
    assert new_api_key() != key and key.startswith("rk_")


def test_key_record_round_trips_through_redis_fields() -> None:
    record = ApiKeyRecord(key_id="0123456789abcdef", name="web",
                          scopes=[ApiScope.recs_read, ApiScope.events_write], rate_per_s=2.5, burst=5)
    fields = {k.encode(): v.encode() for k, v in record.to_redis().items()}
    assert ApiKeyRecord.from_redis(fields) == record
    assert record.allows("recs:read") and not record.allows(ApiScope.catalog_write)


def test_admin_holds_every_scope() -> None:
    admin = ApiKeyRecord(key_id="0" * 16, name="ops", scopes=[ApiScope.admin], rate_per_s=0, burst=1)
    assert all(admin.allows(scope) for scope in ApiScope)


def test_json_log_line_has_event_fields_and_message() -> None:
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test.json")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_event(logger, "cache_miss", user_id="u1", surface="homepage")
        logger.warning("broker_down error=%s", "timeout")
    finally:
        logger.removeHandler(handler)
    first, second = (orjson.loads(JsonFormatter().format(r)) for r in records)
    assert first["event"] == "cache_miss" and first["user_id"] == "u1" and first["level"] == "info"
    assert second["event"] == "broker_down" and second["message"] == "error=timeout"
