"""Publish MovieLens-100K through the real path: the HTTP API, exactly as producers would.

    python -m demo.load [--api http://127.0.0.1:8000] [--force]

Users go to PUT /users/{id}, items to PUT /items/{id}, ratings to
POST /interactions/batch in time order. Skipped when this broker run already
holds the data (the broker keeps its log in memory: a restarted broker is empty
and gets the data again); ``--force`` publishes anyway, which is safe because
event ids are deterministic and every consumer de-duplicates on them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from demo.movielens import MovieLens, load_movielens
from infra.stack import EmbeddedStack
from serving.config import Settings, load_settings

BATCH = 1000
CONCURRENCY = 8


def api_key(settings: Settings) -> str | None:
    """The key to send: RECSYS_API_KEY, else the development key `make up` wrote."""
    if key := os.environ.get("RECSYS_API_KEY"):
        return key
    path = Path(settings.stack.state_dir) / "api-key"
    return path.read_text().strip() if path.exists() else None


async def _run_all(
    label: str, total: int, calls: Sequence[Callable[[], Awaitable[int]]], quiet: bool, concurrency: int = CONCURRENCY
) -> None:
    semaphore = asyncio.Semaphore(concurrency)
    with tqdm(total=total, desc=label, unit="rec", disable=quiet, leave=True) as bar:

        async def guarded(call: Callable[[], Awaitable[int]]) -> None:
            async with semaphore:
                bar.update(await call())

        await asyncio.gather(*(guarded(c) for c in calls))


async def _send(client: httpx.AsyncClient, method: str, url: str, body: object, count: int) -> int:
    for attempt in range(5):
        response = await client.request(method, url, content=body if isinstance(body, bytes) else None,
                                        json=None if isinstance(body, bytes) else body,
                                        headers={"content-type": "application/json"})
        if response.status_code in (200, 202):
            return count
        if response.status_code in (429, 503) and attempt < 4:
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            continue
        raise RuntimeError(f"{method} {url} -> {response.status_code}: {response.text[:300]}")
    raise AssertionError("unreachable")


async def publish(data: MovieLens, api: str, key: str | None, quiet: bool = False) -> dict[str, int]:
    """Publish users, items and interactions through the API; returns the counts sent."""
    headers = {"x-api-key": key} if key else {}
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30.0) as client:
        await _run_all("users", len(data.users), [
            (lambda u=u: _send(client, "PUT", f"/users/{u.user_id}",
                               u.model_dump(mode="json", exclude={"user_id", "updated_at"}, exclude_none=True), 1))
            for u in data.users
        ], quiet)
        await _run_all("items", len(data.items), [
            (lambda i=i: _send(client, "PUT", f"/items/{i.item_id}",
                               i.model_dump(mode="json", exclude={"item_id", "updated_at"}, exclude_none=True), 1))
            for i in data.items
        ], quiet)
        batches = [data.interactions[i : i + BATCH] for i in range(0, len(data.interactions), BATCH)]
        # Batches go out in time order; within the broker, order per user is what matters
        # (one key -> one partition), and each batch is acknowledged whole.
        # One batch at a time keeps each user's events in time order across batches.
        await _run_all("interactions", len(data.interactions), [
            (lambda b=b: _send(client, "POST", "/interactions/batch",
                               b'{"events":[' + b",".join(e.to_json() for e in b) + b"]}", len(b)))
            for b in batches
        ], quiet, concurrency=1)
    return {"users": len(data.users), "items": len(data.items), "interactions": len(data.interactions)}


def live_model_missing(settings: Settings, live: dict[str, Any]) -> str | None:
    """Why the version the registry calls live cannot serve here, or None.

    The registry lives in Redis, the artefacts and vectors under the state folder
    and in Milvus: with the Redis kept and the rest reset, the registry names a
    model whose files or collection are gone, and every ANN source fails.
    """
    if not Path(live.get("artefacts") or "").exists():
        return f"its artefacts folder {live.get('artefacts')!r} is gone"
    from infra.milvus import alias_target, connect

    client = connect(settings)
    try:
        target = alias_target(client, settings.retrieval.serving_alias)
        if target is None or not client.has_collection(target):
            return f"Milvus has no collection behind the alias {settings.retrieval.serving_alias!r}"
    finally:
        client.close()
    return None


def request_first_model(api: str, key: str | None, settings: Settings | None = None) -> str:
    """Ask the trainer for a model if none can serve yet (POST /models/refresh); says what it did."""
    headers = {"x-api-key": key} if key else {}
    with httpx.Client(base_url=api, headers=headers, timeout=10.0) as client:
        models = client.get("/models")
        live = models.json().get("live") if models.status_code == 200 else None
        why = "the first model is training"
        if live:
            missing = live_model_missing(settings or load_settings(), live)
            if missing is None:
                return f"model {live['version']} is live"
            why = f"model {live['version']} is registered as live but {missing}: a new one is training"
        refresh = client.post("/models/refresh")
        if refresh.status_code != 202:
            return f"could not request a model ({refresh.status_code}: {refresh.text[:200]})"
        return (f"{why} in the background (a few minutes); until it is live, "
                "lists come from trending. `GET /models` shows it")


def main(argv: list[str] | None = None) -> int:
    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", default=f"http://{settings.api.host}:{settings.api.port}")
    parser.add_argument("--force", action="store_true", help="publish even if this broker run has the data")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--no-model", action="store_true", help="do not ask for a first model")
    args = parser.parse_args(argv)
    stack = EmbeddedStack(settings)
    marker = Path(settings.stack.state_dir) / "demo-loaded"
    run_id = stack.broker_run_id()
    if not args.force and run_id and marker.exists() and marker.read_text().strip() == run_id:
        print("demo data already loaded into this broker run (use --force to publish again)")
        if not args.no_model:
            print(request_first_model(args.api, api_key(settings), settings))
        return 0
    data = load_movielens()
    counts = asyncio.run(publish(data, args.api, api_key(settings), quiet=args.quiet))
    if run_id:
        marker.write_text(run_id)
    print("published " + ", ".join(f"{n:,} {k}" for k, n in counts.items()))
    if not args.no_model:
        print(request_first_model(args.api, api_key(settings), settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
