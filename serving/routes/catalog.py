"""PUT /users/{user_id}, PUT /items/{item_id}, DELETE /items/{item_id}: publish to the catalog topics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from schemas._base import Identifier
from schemas.api import ErrorResponse, ItemUpsert, UpdatedResponse, UserProfileUpdate
from schemas.catalog import ItemRecord, ItemStatus, UserProfile
from schemas.topics import Topics
from serving.deps import PublisherDep, SettingsDep
from serving.errors import ServiceUnavailable
from serving.publisher import BrokerUnavailable

router = APIRouter(tags=["catalog"])

IdPath = Annotated[Identifier, Path(description="Letters, digits and _.:@- (max 128)")]
_ERRORS: dict[int | str, dict[str, object]] = {
    422: {"model": ErrorResponse, "description": "Invalid body or id"},
    503: {"model": ErrorResponse, "description": "Broker unreachable; nothing was applied"},
}


async def _publish(publisher: PublisherDep, topic: str, key: str, value: bytes) -> None:
    try:
        await publisher.publish(topic, key, value)
    except BrokerUnavailable as exc:
        raise ServiceUnavailable(f"event log unavailable, nothing was applied: {exc}") from exc


@router.put("/users/{user_id}", response_model=UpdatedResponse, responses=_ERRORS)
async def put_user(user_id: IdPath, body: UserProfileUpdate, publisher: PublisherDep, settings: SettingsDep) -> UpdatedResponse:
    """Replace a user's profile; flows pick it up from ``catalog.users``."""
    profile = UserProfile(user_id=user_id, **body.model_dump())
    await _publish(publisher, settings.topic(Topics.CATALOG_USERS), user_id, profile.to_json())
    return UpdatedResponse(status="updated")


@router.put("/items/{item_id}", response_model=UpdatedResponse, responses=_ERRORS)
async def put_item(item_id: IdPath, body: ItemUpsert, publisher: PublisherDep, settings: SettingsDep) -> UpdatedResponse:
    """Create or replace an item; it is embedded and retrievable within seconds."""
    await _publish(publisher, settings.topic(Topics.CATALOG_ITEMS), item_id, body.to_record(item_id).to_json())
    return UpdatedResponse(status="updated")


@router.delete("/items/{item_id}", response_model=UpdatedResponse, responses=_ERRORS)
async def delete_item(item_id: IdPath, publisher: PublisherDep, settings: SettingsDep) -> UpdatedResponse:
    """Remove an item from retrieval: an explicit ``status=deleted`` record, not a tombstone."""
    record = ItemRecord(item_id=item_id, status=ItemStatus.deleted)
    await _publish(publisher, settings.topic(Topics.CATALOG_ITEMS), item_id, record.to_json())
    return UpdatedResponse(status="deleted")
