"""GET/POST /recommendations and GET /recommendations/cached: what the apps call."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from schemas._base import Identifier
from schemas.api import (
    CachedRecommendationsResponse,
    ErrorResponse,
    RecommendationQuery,
    RecommendationRequest,
    RecommendationResponse,
)
from schemas.events import Surface
from schemas.security import ApiScope
from serving.errors import ApiError
from serving.logging import new_request_id
from serving.pipeline.service import Recommender
from serving.security import ApiKeyAuthenticator, api_key_from

router = APIRouter(prefix="/recommendations", tags=["recommendations"])

_ERRORS: dict[int | str, dict[str, object]] = {422: {"model": ErrorResponse, "description": "Invalid parameter"}}


class NoCachedList(ApiError):
    status_code = 404
    error = "not_found"


def _recommender(request: Request) -> Recommender:
    return request.app.state.recommender  # type: ignore[no-any-return]


def _request_id(scope: Scope) -> str:
    # RequestContext put the caller's (or a new) id in the scope's state; set outside it, one is made here.
    return scope.get("state", {}).get("request_id") or new_request_id()


def _json(body: bytes) -> Response:
    # The service's JSON of a RecommendationResponse; returned as is, FastAPI does not validate it
    # a second time against response_model (which still documents the shape).
    return Response(content=body, media_type="application/json")


@cache
def query_parameters() -> list[dict[str, Any]]:
    """The OpenAPI parameters FastAPI documents for ``RecommendationQuery`` as a query model."""
    probe = FastAPI()

    @probe.get("/")
    async def documented(query: Annotated[RecommendationQuery, Query()]) -> None:
        """Never called: FastAPI reads its signature to document the parameters."""

    return probe.openapi()["paths"]["/"]["get"]["parameters"]  # type: ignore[no-any-return]


def parse_query(params: Mapping[str, str]) -> RecommendationRequest:
    """The query string as a request; invalid parameters give the same 422 as FastAPI's own parsing.

    Parsed here rather than declared in the signature: FastAPI re-derives a query
    model's field metadata on every request, which cost ~30% of a cached request's
    handler time (cProfile of cached requests in process).
    """
    try:
        return RecommendationQuery.model_validate(params).to_request()
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from None


@router.get("", response_model=RecommendationResponse, responses=_ERRORS,
            openapi_extra={"parameters": query_parameters()})
async def get_recommendations(request: Request) -> Response:
    """Personalised list for a surface; ``served_from`` says whether it came from cache, live or a fallback."""
    return _json(await _recommender(request).recommend_json(parse_query(dict(request.query_params)),
                                                            _request_id(request.scope)))


@router.post("", response_model=RecommendationResponse, responses=_ERRORS)
async def post_recommendations(request: Request, body: RecommendationRequest) -> Response:
    """The spec's JSON request body form of GET /recommendations."""
    return _json(await _recommender(request).recommend_json(body, _request_id(request.scope)))


@router.get("/cached", response_model=CachedRecommendationsResponse,
            responses={404: {"model": ErrorResponse, "description": "No precomputed list for this user and surface"}})
async def get_cached(request: Request, user_id: Annotated[Identifier, Query()],
                     surface: Surface = Surface.homepage) -> CachedRecommendationsResponse:
    """The precomputed list only (no live fallback): ids and when they were generated."""
    found = await _recommender(request).cached_ids(user_id, surface.value)
    if found is None:
        raise NoCachedList(f"no precomputed {surface.value} list for user {user_id}")
    ids, generated_at = found
    return CachedRecommendationsResponse(recommendations=ids, generated_at=generated_at)


class GetRecommendationsLane:
    """Pure-ASGI middleware answering ``GET /recommendations``, the hottest route, before FastAPI's router.

    It takes the same steps as the route and its router's dependency (the API key
    must hold ``recs:read``; the query is validated by :func:`parse_query`; the
    Recommender answers) but without FastAPI's per-request routing, Request
    objects and dependency solving: on a cached list that machinery cost more
    than the request's own work (cProfile in process). Errors are answered by
    the app's own exception handlers, so their bodies are the route's. The
    FastAPI route stays: it documents the operation in OpenAPI, and serves it
    when the lane is left out (``api.get_recommendations_lane = false``).
    Sits inside RequestContext and LoadShedder: request ids, metrics, access
    logs and shedding apply as to every route.
    """

    path = "/recommendations"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._route: APIRoute | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        app: FastAPI = scope["app"]
        # The route template labels metrics and access logs (RequestContext reads it).
        scope["route"] = self._route or self._find_route()
        state = scope.setdefault("state", {})
        try:
            authenticator: ApiKeyAuthenticator = app.state.authenticator
            state["api_key"] = await authenticator.authenticate(api_key_from(Headers(scope=scope)), ApiScope.recs_read)
            params = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
            body = await app.state.recommender.recommend_json(parse_query(params), _request_id(scope))
        except (ApiError, RequestValidationError) as exc:
            handler = app.exception_handlers[ApiError if isinstance(exc, ApiError) else RequestValidationError]
            await (await handler(Request(scope, receive), exc))(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    def _find_route(self) -> APIRoute:
        # The route object FastAPI's router would have put in the scope (this module's).
        self._route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == self.path
                           and "GET" in r.methods)
        return self._route
