"""Structured logs and per-request context: one JSON object per line, one event name plus fields.

In: every ``logging`` call of the process, and each HTTP request (its
``X-Request-ID`` header). Out: JSON lines on stderr such as

    {"ts": "...", "level": "info", "event": "http_request", "request_id": "...",
     "method": "POST", "route": "/interactions", "status": 202, "duration_ms": 3.1}

and the request id echoed in the ``X-Request-ID`` response header, so a client,
a log line and an impression record can be joined on it.

Log with an event name and fields:

    log_event(log, "cache_miss", user_id=user_id, surface=surface)
    log.warning("broker_down error=%s", err)      # older style: event = first word

The request id of the current request is ``current_request_id()`` (a
contextvar, so it follows awaits and is empty outside requests).
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.config import Settings
from serving.metrics import HTTP_IN_FLIGHT, HTTP_REQUEST_SECONDS, HTTP_REQUESTS
from serving.metrics import child as metric_child

REQUEST_ID_HEADER = "X-Request-ID"
_request_id: ContextVar[str] = ContextVar("request_id", default="")
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:@\-]+$")  # same charset as schemas Identifier
# Fields every LogRecord has; anything else passed through `extra` is an event field.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def current_request_id() -> str:
    """The id of the request being handled ('' outside a request)."""
    return _request_id.get()


def new_request_id() -> str:
    """32 random hex digits, as ``uuid4().hex`` but without a system call per request (ids need not be secret)."""
    return f"{random.getrandbits(128):032x}"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with fields (they become JSON keys)."""
    logger.log(level, event, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, event, logger, request_id, fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, _, rest = message.partition(" ")
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": event,
            "logger": record.name,
        }
        request_id = _request_id.get()
        if request_id:
            body["request_id"] = request_id
        if rest:
            body["message"] = rest
        body.update(getattr(record, "fields", None) or {})
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and name != "fields":
                body.setdefault(name, value)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


class TextFormatter(logging.Formatter):
    """Human-readable lines for local debugging (observability.log_format=text)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        request_id = _request_id.get()
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line += f" {extra}" if extra else ""
        line += f" request_id={request_id}" if request_id else ""
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler we installed, so configuring twice replaces it instead of adding one."""


def configure_logging(settings: Settings) -> None:
    """Send every log record of the process through one formatter on stderr."""
    obs = settings.observability
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(handler)
    handler = _OurHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if obs.log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(obs.log_level.upper())
    # Our http_request event replaces uvicorn's access line (which lacks request_id and route).
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    route_library_loggers()


# The loggers pymilvus configures with its own handlers at import (pymilvus/settings.py).
_PYMILVUS_LOGGERS = ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer")


def route_library_loggers() -> None:
    """Records of libraries with handlers of their own go through ours; pymilvus' per-call errors only at DEBUG.

    Otherwise they would print plain text beside the JSON lines. pymilvus logs
    every failed call at ERROR with a formatted traceback (a search past its
    budget included), which candidate_source_skipped already reports in one
    line; under overload that was many multi-line records a second.

    Called by :func:`configure_logging`, and by infra/milvus.py right after it
    imports pymilvus: that import installs pymilvus' handlers again, and in the
    API it comes after logging is configured (when the recommender is built).
    Does nothing in a process whose logging :func:`configure_logging` did not set up.
    """
    root = logging.getLogger()
    if not any(isinstance(h, _OurHandler) for h in root.handlers):
        return
    for name in ("uvicorn", "uvicorn.error", *_PYMILVUS_LOGGERS):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    quiet = logging.DEBUG if root.level <= logging.DEBUG else logging.CRITICAL
    for name in _PYMILVUS_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


_access_log = logging.getLogger("recsys.access")


class RequestContext:
    """ASGI middleware: request id in and out, latency and status metrics, one access log line.

    Pure ASGI (not BaseHTTPMiddleware) so it adds no task switch per request and
    also sees the 413s of the body-size limit and errors raised by other middleware.
    """

    def __init__(self, app: ASGIApp, max_request_id_length: int = 128) -> None:
        self.app = app
        self.max_len = max_request_id_length

    def _request_id(self, scope: Scope) -> str:
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1").strip()
                if 0 < len(candidate) <= self.max_len and _SAFE_REQUEST_ID.match(candidate):
                    return candidate
                break
        return new_request_id()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self._request_id(scope)
        token = _request_id.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        started = time.perf_counter()
        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            HTTP_IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope.get("method", "")
            metric_child(HTTP_REQUEST_SECONDS, method, route).observe(elapsed)
            metric_child(HTTP_REQUESTS, method, route, str(status)).inc()
            level = logging.WARNING if status >= 500 else logging.INFO
            if _access_log.isEnabledFor(level):
                api_key = scope["state"].get("api_key")
                log_event(
                    _access_log, "http_request", level=level,
                    method=method, route=route, path=scope.get("path", ""), status=status,
                    duration_ms=round(elapsed * 1000, 2),
                    key_id=getattr(api_key, "key_id", None),
                )
            _request_id.reset(token)


def _route_template(scope: Scope) -> str:
    """The matched route's template (/items/{item_id}); unmatched paths share one label."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "<unmatched>"
