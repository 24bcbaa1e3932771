"""Load shedding order: low-priority surfaces are refused first; health is never refused."""

from __future__ import annotations

import asyncio

import orjson

from serving.shedding import LoadShedder

SHARES = {"homepage": 1.0, "ingest": 0.9, "other": 0.9, "up_next": 0.75, "related": 0.5}


def scope(path: str, query: str = "") -> dict:
    return {"type": "http", "method": "GET", "path": path, "query_string": query.encode(), "headers": []}


async def call(shedder: LoadShedder, request_scope: dict) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    await shedder(request_scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def test_related_goes_first_then_up_next_and_homepage_keeps_capacity() -> None:
    async def scenario() -> dict[int, dict[str, int]]:
        release = asyncio.Event()

        async def slow_app(scope, receive, send):  # type: ignore[no-untyped-def]
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        shedder = LoadShedder(slow_app, max_in_flight=8, shares=SHARES)
        held = []
        seen: dict[int, dict[str, int]] = {}
        for level in range(8):
            # With `level` requests already inside, which classes still get in?
            seen[level] = {}
            for surface in ("related", "up_next", "homepage"):
                task = asyncio.create_task(call(shedder, scope("/recommendations", f"surface={surface}")))
                await asyncio.sleep(0)
                if task.done():
                    seen[level][surface] = task.result()[0]
                else:
                    task.cancel()
                    seen[level][surface] = 200
            held.append(asyncio.create_task(call(shedder, scope("/recommendations"))))
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*held)
        return seen

    seen = asyncio.run(scenario())
    assert seen[3] == {"related": 200, "up_next": 200, "homepage": 200}
    assert seen[4] == {"related": 503, "up_next": 200, "homepage": 200}   # related share: 4 of 8
    assert seen[6] == {"related": 503, "up_next": 503, "homepage": 200}   # up_next share: 6 of 8
    assert seen[7]["homepage"] == 200


def test_refusal_is_an_error_response_with_retry_after_and_health_passes() -> None:
    async def scenario() -> tuple:
        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        shedder = LoadShedder(app, max_in_flight=2, shares=SHARES)
        shedder.in_flight = 2  # as if two requests were being handled
        refused = await call(shedder, scope("/recommendations", "surface=related"))
        health = await call(shedder, scope("/healthz"))
        odd = await call(shedder, scope("/recommendations", "surface=%00weird"))
        return refused, health, odd

    (status, headers, body), health, odd = asyncio.run(scenario())
    assert status == 503 and headers["retry-after"] == "1"
    assert orjson.loads(body)["error"] == "overloaded" and "related" in orjson.loads(body)["message"]
    assert health[0] == 200
    assert odd[0] == 503 and "other requests" in orjson.loads(odd[2])["message"]


def test_zero_turns_shedding_off() -> None:
    async def scenario() -> int:
        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        shedder = LoadShedder(app, max_in_flight=0, shares=SHARES)
        shedder.in_flight = 1000
        return (await call(shedder, scope("/recommendations", "surface=related")))[0]

    assert asyncio.run(scenario()) == 200
