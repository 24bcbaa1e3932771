"""Schemathesis against the OpenAPI schema of a real uvicorn server (real broker and Redis).

Property: whatever a client sends, valid or not, the API never answers 5xx
(except 503 for a dependency that is really down, which does not happen here),
every 4xx is an ErrorResponse with a message a person can act on, and
responses match the documented schemas.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from infra.apikeys import create_key
from infra.kafka import ensure_topics
from infra.stack import EmbeddedStack
from schemas.security import ApiScope
from serving.app import create_app
from serving.config import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 40  # per operation: keeps the whole fuzz run well under a minute

schema = schemathesis.openapi.from_dict(
    create_app(Settings(_env_file=None, environment="test")).openapi(),
    config=schemathesis.Config.from_dict({
        "generation": {"max-examples": MAX_EXAMPLES, "with-security-parameters": False,
                       "deterministic": True},
    }),
)


@schemathesis.check
def errors_explain_themselves(ctx: CheckContext, response, case) -> bool | None:  # type: ignore[no-untyped-def]
    """Every 4xx body is an ErrorResponse: an error code and a non-empty message."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict), f"{response.status_code} body is not an object: {body!r}"
        assert body.get("error") and isinstance(body["error"], str), f"no error code: {body}"
        assert isinstance(body.get("message"), str) and len(body["message"]) >= 5, f"no message: {body}"
    return None


@pytest.fixture(scope="module")
def live_api(stack: EmbeddedStack) -> Iterator[tuple[str, dict[str, str]]]:
    """A real uvicorn server on its own port, own topics and key prefix, and an unlimited key."""
    tag = f"fz{uuid.uuid4().hex[:8]}"
    settings = stack.settings.model_copy(deep=True)
    settings.kafka.topic_prefix = f"{tag}."
    settings.redis.key_prefix = f"test:{tag}:"
    settings.__dict__.pop("keys", None)
    ensure_topics(settings)
    key, _ = create_key(settings, "fuzz", list(ApiScope), rate_per_s=0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # start-up builds the recommender (Milvus, Feast): slow on a busy box
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    base_url, headers = f"http://127.0.0.1:{port}", {"X-API-Key": key}
    # Warm every GET route once: some load heavy libraries on first use (Feast: seconds),
    # and this test is about correctness, not cold-start latency.
    for path, operations in schema.raw_schema["paths"].items():
        if "get" in operations:
            httpx.get(base_url + re.sub(r"\{[^}]+\}", "warm", path), params={"user_id": "warm"},
                      headers=headers, timeout=120)
    yield base_url, headers
    server.should_exit = True
    thread.join(timeout=10)


@schema.parametrize()
@hypothesis_settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_api_survives_generated_requests(case, live_api: tuple[str, dict[str, str]]) -> None:  # type: ignore[no-untyped-def]
    base_url, headers = live_api
    response = case.call(base_url=base_url, headers=headers, timeout=30)
    case.validate_response(
        response,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance, errors_explain_themselves],
    )


@pytest.mark.parametrize(
    "body",
    [
        # Found by the fuzz run: a > 64-bit integer broke the dead-letter encoder (500).
        b'{"events": [{"user_id": "u1", "item_id": "i1", "interaction_type": "like",'
        b' "request_id": {"x": 123456789012345678901234567890}}]}',
        # A lone surrogate is valid JSON but not UTF-8: it must not break the 422 body.
        b'{"events": [{"user_id": "u1", "item_id": "i1", "interaction_type": "like", "\\udc80": 1}]}',
    ],
)
def test_fuzz_findings_answer_422_with_a_message(live_api: tuple[str, dict[str, str]], body: bytes) -> None:
    base_url, headers = live_api
    response = httpx.post(f"{base_url}/interactions/batch", content=body,
                          headers={**headers, "content-type": "application/json"}, timeout=10)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error" and response.json()["message"]


def test_undecodable_body_answers_400_with_a_message(live_api: tuple[str, dict[str, str]]) -> None:
    base_url, headers = live_api
    response = httpx.put(f"{base_url}/users/u1", content=b"YHx\xff\xfe\x19",
                         headers={**headers, "content-type": "application/json"}, timeout=10)
    assert response.status_code == 400
    assert response.json() == {"error": "bad_request", "details": [],
                               "message": "the request body could not be parsed: send UTF-8 encoded JSON"}


@pytest.mark.parametrize(
    ("query", "field"),
    [({}, "user_id"), ({"user_id": "u1", "limit": "0"}, "limit"), ({"user_id": "u1", "surface": "inbox"}, "surface"),
     ({"user_id": "u 1"}, "user_id"), ({"user_id": "u1", "device": "fridge"}, "device")],
)
def test_invalid_recommendation_parameters_answer_422_naming_the_parameter(
        live_api: tuple[str, dict[str, str]], query: dict[str, str], field: str) -> None:
    # GET /recommendations parses its query string itself (serving/routes/recommendations.py):
    # the error must read as FastAPI's own would.
    base_url, headers = live_api
    response = httpx.get(f"{base_url}/recommendations", params=query, headers=headers, timeout=10)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "validation_error" and body["details"][0]["field"] == field
    assert body["message"].startswith(f"{field}: ")
