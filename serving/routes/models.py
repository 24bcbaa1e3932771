"""POST /models/refresh (ask the trainer for a new version) and GET /models (what is live).

The refresh is a ``ControlCommand`` on the control topic: the API never trains
in-process; the trainer (``python -m model.worker``) answers it, and the new
version goes live with an atomic Milvus alias swap. Admin scope (app.py).
"""

from __future__ import annotations

from fastapi import APIRouter, status

from schemas.api import ErrorResponse, ModelRefreshResponse
from schemas.events import ControlCommand
from schemas.models import REFRESH_COMMAND, ModelsResponse, ModelVersion
from schemas.topics import Topics
from serving.deps import PublisherDep, RedisDep, SettingsDep
from serving.errors import ServiceUnavailable
from serving.publisher import BrokerUnavailable

router = APIRouter(prefix="/models", tags=["models"])


@router.post("/refresh", status_code=status.HTTP_202_ACCEPTED, response_model=ModelRefreshResponse,
             responses={503: {"model": ErrorResponse, "description": "Broker unreachable; nothing was requested"}})
async def refresh_models(publisher: PublisherDep, settings: SettingsDep) -> ModelRefreshResponse:
    """Ask for retraining from the log; the live version keeps serving until the new one is swapped in."""
    command = ControlCommand(command=REFRESH_COMMAND, requested_by="api")
    try:
        await publisher.publish(settings.topic(Topics.CONTROL), "models", command.to_json())
    except BrokerUnavailable as exc:
        raise ServiceUnavailable(f"event log unavailable, no refresh was requested: {exc}") from exc
    return ModelRefreshResponse(command_id=command.command_id)


@router.get("", response_model=ModelsResponse)
async def list_models(redis: RedisDep, settings: SettingsDep) -> ModelsResponse:
    """The live version (when it was trained, its offline metrics) and the versions kept beside it."""
    try:
        rows = await redis.hgetall(settings.keys.model_registry())
    except Exception as exc:  # noqa: BLE001 (any Redis failure: the registry is unreadable)
        raise ServiceUnavailable(f"model registry unavailable: {exc}") from exc
    versions = sorted((ModelVersion.from_json(v) for k, v in rows.items() if k.startswith(b"version:")),
                      key=lambda e: e.version, reverse=True)
    live = rows.get(b"live", b"").decode()
    return ModelsResponse(live=next((v for v in versions if v.version == live), None), versions=versions)
