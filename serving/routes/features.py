"""GET /users/{user_id}/features and GET /items/{item_id}/features: what the recommender sees.

For operators debugging a recommendation: every Feast online feature value with
the time it was last updated, beside the compact documents the serving hot
path actually reads (``serving``), so a divergence between the two shows.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from schemas._base import Identifier
from schemas.api import ErrorResponse
from schemas.features import OnlineFeaturesResponse
from serving.errors import ApiError
from serving.features import FeastReader, OnlineFeatures

router = APIRouter(tags=["features"])

IdPath = Annotated[Identifier, Path(description="Letters, digits and _.:@- (max 128)")]
_ERRORS: dict[int | str, dict[str, object]] = {404: {"model": ErrorResponse, "description": "No features yet"}}


class NotFound(ApiError):
    status_code = 404
    error = "not_found"


def _readers(request: Request) -> tuple[OnlineFeatures, FeastReader]:
    # Built on first use and kept for the app's life (Feast is slow to import).
    state = request.app.state
    if getattr(state, "feature_readers", None) is None:
        state.feature_readers = (OnlineFeatures(state.settings, state.redis), FeastReader(state.settings))
    return state.feature_readers  # type: ignore[no-any-return]


async def _features(request: Request, entity: str, entity_id: str) -> OnlineFeaturesResponse:
    online, feast = _readers(request)
    serving = await online.serving_documents(entity, entity_id)
    views = await feast.read(entity, entity_id)
    if serving is None and all(v["value"] is None for view in views.values() for v in view.values()):
        raise NotFound(f"no features for {entity} {entity_id!r} yet")
    return OnlineFeaturesResponse(entity=entity, id=entity_id, views=views, serving=serving)


@router.get("/users/{user_id}/features", response_model=OnlineFeaturesResponse, responses=_ERRORS)
async def user_features(user_id: IdPath, request: Request) -> OnlineFeaturesResponse:
    """The user's online features (Feast views user_profile, user_short_term, user_long_term)."""
    return await _features(request, "user", user_id)


@router.get("/items/{item_id}/features", response_model=OnlineFeaturesResponse, responses=_ERRORS)
async def item_features(item_id: IdPath, request: Request) -> OnlineFeaturesResponse:
    """The item's online features (Feast views item_metadata, item_stats)."""
    return await _features(request, "item", item_id)
