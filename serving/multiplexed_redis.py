"""One pipelined Redis connection shared by every request, for the serving hot path's reads.

In: read commands (``get``, ``mget``) from many concurrent requests. Out: their
replies, as redis-py gives them (bytes or None; errors as ``redis.exceptions``).

Why: redis-py's asyncio client spends ~150-200 us of CPU per command (pool
checkout, a timeout per call, its parser layers): 185 us per MGET with 32
concurrent callers on this machine, against 23 us for one pipelined connection
with the same hiredis parser, and 11 us once the commands issued in one turn
of the event loop leave in one write. On a cached GET /recommendations that one MGET
was about a quarter of the worker's CPU (py-spy). Writes, scripts and
pipelines stay on redis-py; only the reads every request makes come here
(``redis.multiplexed_reads``).

Commands are written as they arrive; Redis answers in order on one connection,
so replies go to callers first in, first out (as aioredis 1.x did). A caller
that gives up (its budget ran out) keeps its place in the queue; its reply is
dropped when it comes. A reply later than ``socket_timeout_s`` fails every call
waiting on the connection with ``TimeoutError`` and closes it; a lost
connection fails them with ``ConnectionError``. The next call reconnects.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any

import hiredis
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _pack(*args: str | bytes | int | float) -> bytes:
    # hiredis' stub declares a 1-tuple where any number of arguments is meant.
    return hiredis.pack_command(args)  # type: ignore[arg-type]


class _Replies(asyncio.Protocol):
    """The connection: commands out, replies matched to waiters in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outgoing: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self.waiting.append((waiter, time.monotonic()))
        # Commands issued in the same turn of the event loop leave in one write (one syscall).
        if not self.outgoing:
            loop.call_soon(self._flush)
        self.outgoing.append(packed)
        return waiter

    def _flush(self) -> None:
        if self.outgoing and self.open:
            self.transport.write(b"".join(self.outgoing))  # type: ignore[union-attr]
        self.outgoing.clear()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                if not self.waiting:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                waiter, _ = self.waiting.popleft()
                if waiter.done():  # its caller gave up
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    waiter.set_exception(ResponseError(str(reply)))
                else:
                    waiter.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.fail(InvalidResponse(f"redis sent a reply that is not RESP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"redis connection lost: {exc or 'closed by the server'}"))

    @property
    def open(self) -> bool:
        return self.error is None and self.transport is not None and not self.transport.is_closing()

    def fail(self, error: Exception) -> None:
        """Close the connection; every waiting call raises ``error``."""
        if self.error is None:
            self.error = error
        while self.waiting:
            waiter, _ = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


class MultiplexedRedis:
    """``get`` and ``mget`` over one pipelined connection, opened on first use in the running loop."""

    def __init__(self, url: str, socket_timeout_s: float, connect_timeout_s: float | None = None) -> None:
        self.url = url
        self.params = parse_url(url)
        self.timeout_s = socket_timeout_s
        self.connect_timeout_s = connect_timeout_s or socket_timeout_s
        self._conn: _Replies | None = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    async def get(self, key: str) -> bytes | None:
        return await self.execute("GET", key)  # type: ignore[no-any-return]

    async def mget(self, keys: str | list[str], *more: str) -> list[bytes | None]:
        """Same call shapes as redis-py: ``mget([k1, k2])`` or ``mget(k1, k2)``."""
        names = [keys, *more] if isinstance(keys, str) else [*keys, *more]
        if not names:
            return []
        return await self.execute("MGET", *names)  # type: ignore[no-any-return]

    async def execute(self, *args: str | bytes | int | float) -> Any:
        conn = self._conn
        if conn is None or not conn.open:
            conn = await self._connect()
        return await conn.call(_pack(*args))

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._conn is not None:
            self._conn.fail(RedisConnectionError("client closed"))
            self._conn = None

    # -- connection ----------------------------------------------------------------
    async def _connect(self) -> _Replies:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is not None and self._conn.open:
                return self._conn  # another caller connected while this one waited
            loop = asyncio.get_running_loop()
            conn = await self._open(loop)
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    for command in self._handshake():
                        await conn.call(command)
            except BaseException as exc:  # a refused AUTH or SELECT included: nothing stays open
                conn.fail(RedisConnectionError(f"redis handshake failed: {exc!r}"))
                if isinstance(exc, TimeoutError):
                    raise RedisTimeoutError(f"redis handshake took over {self.connect_timeout_s}s") from None
                raise
            self._conn = conn
            if self._watchdog is None:
                self._watchdog = loop.call_later(self.timeout_s / 2, self._check_replies)
            return conn

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Replies:
        p = self.params
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if "path" in p:
                    _, conn = await loop.create_unix_connection(_Replies, p["path"])
                else:
                    tls = ssl.create_default_context() if self.url.startswith("rediss://") else None
                    _, conn = await loop.create_connection(_Replies, p.get("host", "localhost"), p.get("port", 6379),
                                                           ssl=tls)
        except TimeoutError:
            raise RedisTimeoutError(f"connecting to redis took over {self.connect_timeout_s}s") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to redis: {exc}") from exc
        return conn

    def _handshake(self) -> list[bytes]:
        p, commands = self.params, []
        if p.get("password"):
            auth = ("AUTH", p["username"], p["password"]) if p.get("username") else ("AUTH", p["password"])
            commands.append(_pack(*auth))
        if p.get("db"):
            commands.append(_pack("SELECT", p["db"]))
        return commands

    def _check_replies(self) -> None:
        # One timer for the whole connection instead of one per call: the oldest waiting call
        # tells whether Redis stopped answering.
        conn = self._conn
        if conn is not None and conn.waiting and time.monotonic() - conn.waiting[0][1] > self.timeout_s:
            conn.fail(RedisTimeoutError(f"no reply from redis within {self.timeout_s}s"))
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout_s / 2, self._check_replies)
