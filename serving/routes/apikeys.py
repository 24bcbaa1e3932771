"""Key management over HTTP (admin scope): POST/GET /admin/keys, DELETE /admin/keys/{key_id}.

The same operations as ``python -m infra.apikeys``; the created key is shown in
the response once and only its hash is stored. A revocation takes effect at
once on this replica and within ``security.key_cache_ttl_s`` on the others.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request, status

from infra.apikeys import KeyNotFound, create_key, list_keys, revoke_key
from schemas.api import ErrorResponse
from schemas.security import ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyRecord
from serving.deps import SettingsDep
from serving.errors import ApiError

router = APIRouter(prefix="/admin/keys", tags=["admin"])


class UnknownKey(ApiError):
    status_code = 404
    error = "not_found"


KeyIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="The key's public id (16 hex digits)")]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
async def create(body: ApiKeyCreate, settings: SettingsDep) -> ApiKeyCreated:
    """Create a key; the response is the only place the key itself ever appears."""
    key, record = await asyncio.to_thread(create_key, settings, body.name, body.scopes, body.rate_per_s, body.burst)
    return ApiKeyCreated(api_key=key, **record.model_dump())


@router.get("", response_model=ApiKeyList)
async def list_all(settings: SettingsDep) -> ApiKeyList:
    """Every key's record (ids, names, scopes, limits; no secrets exist to show)."""
    return ApiKeyList(keys=await asyncio.to_thread(list_keys, settings))


@router.delete("/{key_id}", response_model=ApiKeyRecord,
               responses={404: {"model": ErrorResponse, "description": "No key has this id"}})
async def revoke(key_id: KeyIdPath, request: Request, settings: SettingsDep) -> ApiKeyRecord:
    """Revoke a key: refused from now on here, within the key cache TTL elsewhere."""
    try:
        record = await asyncio.to_thread(revoke_key, settings, key_id)
    except KeyNotFound as exc:
        raise UnknownKey(str(exc)) from exc
    request.app.state.authenticator.forget(key_id)
    return record
