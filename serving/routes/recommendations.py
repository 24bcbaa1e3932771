"""GET/POST /recommendations and GET /recommendations/cached: what the apps call."""

from __future__ import annotations

import uuid
from functools import cache
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from schemas._base import Identifier
from schemas.api import (
    CachedRecommendationsResponse,
    ErrorResponse,
    RecommendationQuery,
    RecommendationRequest,
    RecommendationResponse,
)
from schemas.events import Surface
from serving.errors import ApiError
from serving.pipeline.service import Recommender

router = APIRouter(prefix="/recommendations", tags=["recommendations"])

_ERRORS: dict[int | str, dict[str, object]] = {422: {"model": ErrorResponse, "description": "Invalid parameter"}}


class NoCachedList(ApiError):
    status_code = 404
    error = "not_found"


def _recommender(request: Request) -> Recommender:
    return request.app.state.recommender  # type: ignore[no-any-return]


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def _json(response: RecommendationResponse) -> Response:
    # The service built a valid RecommendationResponse; returning its JSON skips FastAPI's
    # second validation of it against response_model (which still documents the shape).
    return Response(content=response.model_dump_json(), media_type="application/json")


@cache
def query_parameters() -> list[dict[str, Any]]:
    """The OpenAPI parameters FastAPI documents for ``RecommendationQuery`` as a query model."""
    probe = FastAPI()

    @probe.get("/")
    async def documented(query: Annotated[RecommendationQuery, Query()]) -> None:
        """Never called: FastAPI reads its signature to document the parameters."""

    return probe.openapi()["paths"]["/"]["get"]["parameters"]  # type: ignore[no-any-return]


def parse_query(request: Request) -> RecommendationRequest:
    """The query string as a request; invalid parameters give the same 422 as FastAPI's own parsing.

    Parsed here rather than declared in the signature: FastAPI re-derives a query
    model's field metadata on every request, which cost ~30% of a cached request's
    handler time (cProfile of cached requests in process).
    """
    try:
        return RecommendationQuery.model_validate(dict(request.query_params)).to_request()
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from None


@router.get("", response_model=RecommendationResponse, responses=_ERRORS,
            openapi_extra={"parameters": query_parameters()})
async def get_recommendations(request: Request) -> Response:
    """Personalised list for a surface; ``served_from`` says whether it came from cache, live or a fallback."""
    return _json(await _recommender(request).recommend(parse_query(request), _request_id(request)))


@router.post("", response_model=RecommendationResponse, responses=_ERRORS)
async def post_recommendations(request: Request, body: RecommendationRequest) -> Response:
    """The spec's JSON request body form of GET /recommendations."""
    return _json(await _recommender(request).recommend(body, _request_id(request)))


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
