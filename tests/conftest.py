"""Shared fixtures: real services for the integration and end-to-end tiers.

- a tansu broker of its own on a free port (so a running `make up` stack is untouched);
- the local Redis (started if none answers), every test under its own key prefix;
- the Milvus server of the embedded stack (reused if one answers, else started
  under a temporary folder and stopped at the end), every test with its own
  collection names.

Each test that asks for ``settings`` gets a unique topic prefix and Redis key
prefix, with its topics created, so tests never see each other's data.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.kafka import ensure_topics
from infra.stack import MILVUS, REDIS, EmbeddedStack
from serving.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """Broker (own), Redis and Milvus for the whole session; stops only what it started."""
    broker_port = free_port()
    base = load_settings()
    settings = load_settings(
        environment="test",
        kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}"},
        redis=base.redis.model_dump(),
        milvus=base.milvus.model_dump(),
        stack={**base.stack.model_dump(), "state_dir": tmp_path_factory.mktemp("test-stack"),
               "broker_listen": f"127.0.0.1:{broker_port}"},
    )
    stack = EmbeddedStack(settings)
    started: list[str] = []
    try:  # a part that fails to start must not leave the ones before it running
        stack.start(stack.broker())
        started.append(stack.broker().name)
        if stack.start(stack.redis_server(), adopt_external=True) == "started":
            started.append(REDIS)
        if stack.start_milvus() == "started":
            started.append(MILVUS)
        yield stack
    finally:
        for name in reversed(started):
            stack.stop(name)


@pytest.fixture
def settings(stack: EmbeddedStack) -> Settings:
    """Settings isolated for one test: own topics (created) and own Redis key prefix."""
    tag = f"t{uuid.uuid4().hex[:10]}"
    isolated = stack.settings.model_copy(deep=True)
    isolated.kafka.topic_prefix = f"{tag}."
    isolated.redis.key_prefix = f"test:{tag}:"
    isolated.__dict__.pop("keys", None)  # the cached key builder follows the new prefix
    ensure_topics(isolated)
    return isolated


@pytest.fixture
def api_key(settings: Settings) -> str:
    """A key with every scope, stored under this test's Redis prefix."""
    from infra.apikeys import create_key
    from schemas.security import ApiScope

    key, _ = create_key(settings, "test", list(ApiScope), rate_per_s=0)
    return key


@pytest.fixture
def auth_headers(api_key: str) -> dict[str, str]:
    """Headers that authenticate as ``api_key``."""
    return {"X-API-Key": api_key}


def pytest_report_header(config: pytest.Config) -> str:
    return f"recsys tests; RECSYS_ENVIRONMENT={os.environ.get('RECSYS_ENVIRONMENT', 'test')}"
