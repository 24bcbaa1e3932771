"""/healthz (the process is alive) and /readyz (broker, Redis and Milvus reachable)."""

from __future__ import annotations

import asyncio
import urllib.request

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.config import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 when every dependency answers; 503 naming the ones that do not."""
    settings: Settings = request.app.state.settings
    checks = await asyncio.gather(
        request.app.state.publisher.ping(timeout_s=1.0),
        _redis_ok(request),
        asyncio.to_thread(_milvus_ok, settings),
    )
    status = dict(zip(("broker", "redis", "milvus"), ("up" if ok else "down" for ok in checks), strict=True))
    down = [name for name, state in status.items() if state == "down"]
    body = {"status": "ready" if not down else "not_ready", "dependencies": status}
    if down:
        body["message"] = f"unreachable: {', '.join(down)}"
    return JSONResponse(body, status_code=503 if down else 200)


async def _redis_ok(request: Request) -> bool:
    try:
        async with asyncio.timeout(1.0):
            return bool(await request.app.state.redis.ping())
    except Exception:  # noqa: BLE001 (any failure is "down")
        return False


def _milvus_ok(settings: Settings) -> bool:
    url = settings.milvus.health_url
    if url:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 (configured URL)
                return response.status == 200
        except OSError:
            return False
    from infra.stack import port_open, split_host_port

    return port_open(*split_host_port(settings.milvus.uri.split("://", 1)[-1]), timeout_s=1.0)
