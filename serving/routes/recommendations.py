"""GET/POST /recommendations and GET /recommendations/cached: what the apps call."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request

from schemas._base import Identifier
from schemas.api import (
    MAX_LIMIT,
    CachedRecommendationsResponse,
    ErrorResponse,
    RecommendationContext,
    RecommendationRequest,
    RecommendationResponse,
)
from schemas.events import Device, Surface
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


@router.get("", response_model=RecommendationResponse, responses=_ERRORS)
async def get_recommendations(
    request: Request,
    user_id: Annotated[Identifier, Query()],
    surface: Surface = Surface.homepage,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 10,
    current_item_id: Annotated[Identifier | None, Query()] = None,
    device: Device | None = None,
    region: Annotated[str | None, Query(max_length=64)] = None,
) -> RecommendationResponse:
    """Personalised list for a surface; ``served_from`` says whether it came from cache, live or a fallback."""
    body = RecommendationRequest(
        user_id=user_id, surface=surface, limit=limit,
        context=RecommendationContext(current_item_id=current_item_id, device=device, region=region),
    )
    return await _recommender(request).recommend(body, _request_id(request))


@router.post("", response_model=RecommendationResponse, responses=_ERRORS)
async def post_recommendations(request: Request, body: RecommendationRequest) -> RecommendationResponse:
    """The spec's JSON request body form of GET /recommendations."""
    return await _recommender(request).recommend(body, _request_id(request))


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
