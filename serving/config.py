"""All settings in one place: every default here, overridable by ``RECSYS_*`` env vars.

Nested sections use ``__``: ``RECSYS_KAFKA__BOOTSTRAP_SERVERS=broker:9092``.
Built once at each entry point (API, flow, CLI) and passed down.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.keys import RedisKeys
from schemas.topics import TopicSpec, topic_name


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    # Prefix for every topic name: isolates tenants or test runs on one broker.
    topic_prefix: str = ""
    # tansu makes a new group member wait ~23 s with the librdkafka default (DESIGN.md).
    session_timeout_ms: int = 6000
    # How long the API waits for the broker's ack before answering 503.
    produce_timeout_s: float = 3.0
    # librdkafka batching: small linger keeps p50 low, concurrency still batches.
    linger_ms: int = 2


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "recsys:"
    socket_timeout_s: float = 0.25


class MilvusSettings(BaseModel):
    uri: str = "http://127.0.0.1:19530"
    # The standalone server's health endpoint (port 9091); empty for Milvus Lite.
    health_url: str = "http://127.0.0.1:9091/healthz"
    timeout_s: float = 2.0


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    # Bigger batches get 413: they would hold one request open for too long.
    max_batch_events: int = 1000
    # Request bodies over this size get 413 before they are parsed.
    max_body_bytes: int = 2_000_000


# Refused outside development/test (see Settings._check_production).
DEV_API_KEY_PEPPER = "insecure-development-pepper"


class SecuritySettings(BaseModel):
    """API keys, scopes and per-key rate limits (serving/security.py, infra/apikeys.py)."""

    # Off only for local experiments: every route then answers without a key.
    auth_enabled: bool = True
    # Secret mixed into every key hash (HMAC-SHA256): a leaked Redis dump alone
    # cannot be used to check guessed keys. Changing it invalidates every key.
    api_key_pepper: str = DEV_API_KEY_PEPPER
    # Key records are cached in-process this long: a revoked key keeps working on
    # a replica for at most this many seconds. 0 disables the cache.
    key_cache_ttl_s: float = 5.0
    # While Redis is unreachable a key seen valid within this window is still
    # accepted (without rate limiting) so serving degrades instead of failing;
    # unknown keys get 503. 0 turns this grace off (fail closed).
    redis_outage_grace_s: float = 300.0
    # Token bucket for keys created without --rate/--burst.
    default_rate_per_s: float = 50.0
    default_burst: int = 100


class ObservabilitySettings(BaseModel):
    """Structured logs and Prometheus metrics (serving/logging.py, serving/metrics.py)."""

    # "json": one JSON object per line (production); "text": human-readable (local debugging).
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    # A client's X-Request-ID is kept only if it is this short and plain; else a new one is made.
    max_request_id_length: int = 128


class StackSettings(BaseModel):
    """The embedded local stack (infra/stack.py)."""

    state_dir: Path = Path(".recsys")
    broker_listen: str = "127.0.0.1:9092"
    # "server": the real Milvus standalone (milvus==2.3.5); "lite": milvus-lite server.
    milvus_backend: Literal["server", "lite"] = "server"
    milvus_port: int = 19530
    redis_port: int = 6379
    start_timeout_s: float = 90.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RECSYS_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    environment: Literal["development", "test", "production"] = "development"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    stack: StackSettings = Field(default_factory=StackSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        if self.environment == "production" and "127.0.0.1" in self.kafka.bootstrap_servers:
            raise ValueError("production settings point Kafka at loopback; set RECSYS_KAFKA__BOOTSTRAP_SERVERS")
        if self.environment not in ("development", "test"):
            if self.security.api_key_pepper == DEV_API_KEY_PEPPER:
                raise ValueError(
                    f"environment {self.environment!r} refuses the default API key pepper; "
                    "set RECSYS_SECURITY__API_KEY_PEPPER to a long random secret"
                )
            if not self.security.auth_enabled:
                raise ValueError(
                    f"environment {self.environment!r} refuses RECSYS_SECURITY__AUTH_ENABLED=false"
                )
            if len(self.security.api_key_pepper) < 16:
                raise ValueError("RECSYS_SECURITY__API_KEY_PEPPER must be at least 16 characters")
        return self

    def topic(self, spec: TopicSpec) -> str:
        """Physical name of a topic under this deployment's prefix."""
        return topic_name(spec, self.kafka.topic_prefix)

    @cached_property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.redis.key_prefix)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and .env), with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
