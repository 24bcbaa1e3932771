"""The serving hot path's multiplexed Redis reads on the real Redis: replies reach the right caller, failures are clean.

One connection carries every caller's commands, so what matters is that a
reply never reaches the wrong caller (under concurrency, after a caller gave
up) and that a dead or silent server fails the waiting calls with redis'
own exceptions instead of hanging them, after which the client reconnects.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.exceptions

from serving.config import Settings
from serving.multiplexed_redis import MultiplexedRedis

pytestmark = pytest.mark.integration


def test_concurrent_callers_each_get_their_own_replies(settings: Settings) -> None:
    plain = redis.Redis.from_url(settings.redis.url)
    keys = [f"{settings.redis.key_prefix}mux:{n}" for n in range(300)]
    plain.mset({key: f"value-{n}" for n, key in enumerate(keys)})

    async def scenario() -> tuple[list[object], list[object], object, object]:
        client = MultiplexedRedis(settings.redis.url, socket_timeout_s=1.0)
        singles = await asyncio.gather(*(client.get(key) for key in keys))
        pairs = await asyncio.gather(*(client.mget(key, keys[0] + "-missing") for key in keys))
        as_list = await client.mget([keys[1], keys[2]])
        empty = await client.mget([])
        await client.aclose()
        return singles, pairs, as_list, empty

    singles, pairs, as_list, empty = asyncio.run(scenario())
    plain.delete(*keys)
    assert singles == [f"value-{n}".encode() for n in range(300)]
    assert pairs == [[f"value-{n}".encode(), None] for n in range(300)]
    assert as_list == [b"value-1", b"value-2"] and empty == []


def test_an_error_reply_raises_for_its_caller_only(settings: Settings) -> None:
    plain = redis.Redis.from_url(settings.redis.url)
    a_list, a_string = f"{settings.redis.key_prefix}mux:list", f"{settings.redis.key_prefix}mux:string"
    plain.rpush(a_list, "x")
    plain.set(a_string, "fine")

    async def scenario() -> list[object]:
        client = MultiplexedRedis(settings.redis.url, socket_timeout_s=1.0)
        results = await asyncio.gather(client.get(a_string), client.get(a_list), client.get(a_string),
                                       return_exceptions=True)
        await client.aclose()
        return results

    before, failed, after = asyncio.run(scenario())
    plain.delete(a_list, a_string)
    assert before == after == b"fine"
    assert isinstance(failed, redis.exceptions.ResponseError) and "WRONGTYPE" in str(failed)


def test_a_caller_that_gives_up_does_not_shift_the_replies_of_the_next(settings: Settings) -> None:
    plain = redis.Redis.from_url(settings.redis.url)
    first, second = f"{settings.redis.key_prefix}mux:first", f"{settings.redis.key_prefix}mux:second"
    plain.set(first, "1")
    plain.set(second, "2")

    async def scenario() -> object:
        client = MultiplexedRedis(settings.redis.url, socket_timeout_s=1.0)
        await client.get(first)  # connected
        task = asyncio.ensure_future(client.get(first))
        await asyncio.sleep(0)  # its command is on the wire
        task.cancel()
        value = await client.get(second)
        await client.aclose()
        return value

    assert asyncio.run(scenario()) == b"2"
    plain.delete(first, second)


def test_a_killed_connection_fails_waiting_calls_and_the_next_call_reconnects(settings: Settings) -> None:
    plain = redis.Redis.from_url(settings.redis.url)
    key = f"{settings.redis.key_prefix}mux:key"
    plain.set(key, "v")

    async def scenario() -> tuple[object, object]:
        client = MultiplexedRedis(settings.redis.url, socket_timeout_s=1.0)
        client_id = await client.execute("CLIENT", "ID")
        blocked = asyncio.ensure_future(client.execute("BLPOP", f"{key}:never", 5))
        await asyncio.sleep(0.05)
        plain.client_kill_filter(_id=client_id)
        failed = await asyncio.gather(blocked, return_exceptions=True)
        value = await client.get(key)
        await client.aclose()
        return failed[0], value

    failed, value = asyncio.run(scenario())
    plain.delete(key)
    assert isinstance(failed, redis.exceptions.ConnectionError)
    assert value == b"v"


def test_a_server_that_never_answers_times_out_instead_of_hanging() -> None:
    async def scenario() -> tuple[object, float]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1 << 16)
            await asyncio.sleep(10)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = MultiplexedRedis(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.2)
        started = time.monotonic()
        outcome = await asyncio.gather(client.get("k"), return_exceptions=True)
        waited = time.monotonic() - started
        await client.aclose()
        server.close()
        return outcome[0], waited

    outcome, waited = asyncio.run(scenario())
    assert isinstance(outcome, redis.exceptions.TimeoutError)
    assert waited < 1.0


def test_nothing_listening_and_a_refused_handshake_raise_redis_errors(settings: Settings) -> None:
    from tests.conftest import free_port

    async def scenario() -> list[object]:
        nobody = MultiplexedRedis(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
        # The local Redis has no password: AUTH is refused, and the call says so.
        host_port = settings.redis.url.split("//", 1)[1].split("/", 1)[0]
        wrong_password = MultiplexedRedis(f"redis://:not-the-password@{host_port}/0", socket_timeout_s=0.5)
        return await asyncio.gather(nobody.get("k"), wrong_password.get("k"), return_exceptions=True)

    refused, unauthenticated = asyncio.run(scenario())
    assert isinstance(refused, redis.exceptions.ConnectionError) and "cannot connect" in str(refused)
    assert isinstance(unauthenticated, redis.exceptions.ResponseError)


def test_the_database_number_in_the_url_is_selected(settings: Settings) -> None:
    base = settings.redis.url.rsplit("/", 1)[0]
    other_db = redis.Redis.from_url(f"{base}/5")
    key = f"{settings.redis.key_prefix}mux:db5"
    other_db.set(key, "in five")

    async def scenario() -> tuple[object, object]:
        five, zero = MultiplexedRedis(f"{base}/5", 1.0), MultiplexedRedis(f"{base}/0", 1.0)
        values = await five.get(key), await zero.get(key)
        await five.aclose()
        await zero.aclose()
        return values

    assert asyncio.run(scenario()) == (b"in five", None)
    other_db.delete(key)
