"""Domain errors carry their HTTP status; one set of handlers maps every error to ErrorResponse."""

from __future__ import annotations

import json
import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.api import ErrorDetail, ErrorResponse
from schemas.events import DeadLetterRecord
from schemas.topics import Topics
from serving.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)


class ApiError(Exception):
    status_code = 400
    error = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class PayloadTooLarge(ApiError):
    status_code = 413
    error = "payload_too_large"


class ServiceUnavailable(ApiError):
    status_code = 503
    error = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 2) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


def error_body(error: str, message: str, details: list[ErrorDetail] | None = None) -> dict[str, object]:
    return ErrorResponse(error=error, message=message, details=details or []).model_dump(mode="json")


def _field_path(loc: tuple[object, ...]) -> str:
    # ("body", "events", 3, "user_id") -> "events[3].user_id"
    path = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or str(loc[0] if loc else "body")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.error, exc.message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [ErrorDetail(field=_printable(_field_path(tuple(e.get("loc", ())))), message=_printable(e.get("msg", "invalid"))) for e in exc.errors()]
        message = "; ".join(f"{d.field}: {d.message}" for d in details[:5])
        if request.url.path.startswith("/interactions"):
            _dead_letter_rejected(request, message, exc.body)
        return JSONResponse(error_body("validation_error", message, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's words for a body that is not decodable (bad UTF-8, broken form data).
            message = "the request body could not be parsed: send UTF-8 encoded JSON"
        return JSONResponse(error_body(error, message), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Runs outermost (Starlette's ServerErrorMiddleware), which logs the traceback;
        # the client gets the request id to quote, never internals.
        request_id = request.scope.get("state", {}).get("request_id", "")
        return JSONResponse(
            error_body("internal_error", f"internal error; quote request_id {request_id} when reporting it"),
            status_code=500,
            headers={"X-Request-ID": request_id} if request_id else None,
        )


def _dead_letter_rejected(request: Request, reason: str, body: object) -> None:
    """Rejected events are answered 422 *and* kept on the dead-letter topic with the reason."""
    publisher = getattr(request.app.state, "publisher", None)
    if publisher is None or body is None:
        return
    settings = request.app.state.settings
    if settings.security.auth_enabled and getattr(request.state, "api_key", None) is None:
        # Unparseable JSON is rejected before authentication runs: an anonymous
        # caller must not be able to write to the dead-letter topic.
        return
    try:
        if not isinstance(body, bytes | str):
            try:
                body = orjson.dumps(body, default=str)
            except TypeError:  # integers over 64 bits, lone surrogates: the slower encoder copes
                body = json.dumps(body, default=str, ensure_ascii=True)
        record = DeadLetterRecord.wrap(source="api", reason=_printable(reason), payload=_printable(body),
                                       topic=settings.topic(Topics.INTERACTIONS))
        publisher.publish_nowait(settings.topic(Topics.DEAD_LETTER), "api", record.to_json())
    except Exception:  # a failure to keep the letter must not turn the client's 422 into a 500
        log.exception("dead_letter_failed")
        return
    DEAD_LETTERS.labels(source="api").inc()


def _printable(text: str | bytes) -> str:
    """Text that encodes as UTF-8: lone surrogates (valid in JSON escapes, not in UTF-8) become '?'."""
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    return text.encode("utf-8", "replace").decode("utf-8")
