"""Build the Feast store from Settings, apply the definitions, and write rows fast.

    python -m feature_repo.store apply   # what `feast apply` does, for the configured project

Flows write through ``OnlineWriter``: protobuf rows straight into Feast's Redis
layout in one pipeline per batch, skipping the DataFrame round trip of
``store.push`` (6.5 ms per call) and Feast's per-row overheads.
"""

from __future__ import annotations

import argparse
import fcntl
import re
import struct
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from feast import FeatureStore, FeatureView, RepoConfig
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Array, Float64, Int64, String
from redis.exceptions import ResponseError

from feature_repo import feature_definitions as defs
from serving.config import Settings

REPO_DIR = Path(__file__).resolve().parent


def project_name(settings: Settings) -> str:
    """The Feast project: explicit, or derived from the Redis key prefix ("recsys:" -> "recsys")."""
    name = settings.features.feast_project or re.sub(r"[^A-Za-z0-9_]+", "_", settings.redis.key_prefix).strip("_")
    return name or "recsys"


def redis_connection_string(url: str) -> str:
    """redis://host:port/db -> Feast's "host:port,db=N[,password=...]"."""
    parsed = urlparse(url)
    parts = [f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"]
    db = (parsed.path or "/0").lstrip("/") or "0"
    parts.append(f"db={db}")
    if parsed.password:
        parts.append(f"password={parsed.password}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def repo_config(settings: Settings) -> RepoConfig:
    project = project_name(settings)
    registry = Path(settings.features.registry_dir).resolve() / f"registry-{project}.db"
    return RepoConfig(
        project=project,
        provider="local",
        registry=str(registry),
        online_store=RedisOnlineStoreConfig(connection_string=redis_connection_string(settings.redis.url)),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=REPO_DIR,
    )


def feature_store(settings: Settings, apply: bool = True) -> FeatureStore:
    """A FeatureStore for this deployment; with ``apply``, the definitions are registered first."""
    config = repo_config(settings)
    registry = Path(config.registry.path)
    registry.parent.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(repo_path=str(REPO_DIR), config=config)
    if apply:
        # Several flow processes may start together: one applies, the others wait.
        with open(registry.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            names = {view.name for view in store.list_feature_views()} if registry.exists() else set()
            if names != {view.name for view in defs.FEATURE_VIEWS}:
                store.apply([*defs.ENTITIES, *defs.PUSH_SOURCES, *defs.FEATURE_VIEWS])
                store.refresh_registry()
    return store


# Feast's online store holds each feature as a serialized ValueProto. Building a
# protobuf message per value was most of the sink's time, so the few shapes the
# views use are encoded here byte for byte as protobuf does (a unit test compares
# them with ValueProto(...).SerializeToString() value by value).
_NULL = b""  # ValueProto() with no value set


_SMALL = [bytes((n,)) for n in range(128)]


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _SMALL[n]
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf writes it
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(value: Any) -> bytes:
    raw = str(value).encode()
    return b"\x12" + _varint(len(raw)) + raw  # field 2 (string_val), length-delimited


_SMALL_INT64 = [b"\x20" + small for small in _SMALL]
_TAGGED_DOUBLE = struct.Struct("<Bd").pack


def _int64(value: Any) -> bytes:
    n = int(value)
    return _SMALL_INT64[n] if 0 <= n < 128 else b"\x20" + _varint(n)  # field 4 (int64_val), varint


def _double(value: Any) -> bytes:
    return _TAGGED_DOUBLE(0x29, float(value))  # field 5 (double_val), 64-bit: tag and value in one call


# Lists repeat the same strings (item ids, interaction types, categories) row after
# row: their encoded element is remembered, bounded.
_ELEMENTS: dict[str, bytes] = {}


def _element(value: Any) -> bytes:
    raw = str(value).encode()
    encoded = b"\x0a" + _varint(len(raw)) + raw  # StringList.val (1)
    if isinstance(value, str):
        if len(_ELEMENTS) > 100_000:
            _ELEMENTS.clear()
        _ELEMENTS[value] = encoded
    return encoded


def _string_list(values: Any) -> bytes:
    known = _ELEMENTS.get
    inner = b"".join([known(v) or _element(v) if isinstance(v, str) else _element(v) for v in values])
    return b"\x62" + _varint(len(inner)) + inner  # field 12 (string_list_val)


def _double_list(values: Any) -> bytes:
    if not values:
        return b"\x7a\x00"
    packed = struct.pack(f"<{len(values)}d", *values)
    inner = b"\x0a" + _varint(len(packed)) + packed  # DoubleList.val (1), packed
    return b"\x7a" + _varint(len(inner)) + inner  # field 15 (double_list_val)


def timestamp_bytes(epoch_us: int) -> bytes:
    """A serialized google.protobuf.Timestamp for a time in epoch microseconds."""
    seconds, micros = divmod(epoch_us, 1_000_000)
    return (b"\x08" + _varint(seconds) if seconds else b"") + (b"\x10" + _varint(micros * 1000) if micros else b"")


def value_encoder(dtype: Any) -> Callable[[Any], bytes]:
    """python value (not None) -> serialized ValueProto, for one Feast dtype."""
    if dtype == String:
        return _string
    if dtype == Int64:
        return _int64
    if dtype == Float64:
        return _double
    if dtype == Array(String):
        return _string_list
    if dtype == Array(Float64):
        return _double_list
    raise TypeError(f"no proto mapping for {dtype}")


def execute_commands(client: Any, commands: list[tuple[Any, ...]]) -> None:
    """Send ``commands`` (argument tuples) to Redis in one write and read every reply.

    What ``client.pipeline(transaction=False)`` does, without its per-command Python
    layers (argument normalising, response callbacks): those were a third of the
    feature sink's time. Error replies raise; a connection error resends the whole
    batch after reconnecting, as redis-py's pipeline does (the callers' writes are
    overwrites, so a resent batch changes nothing).
    """
    if not commands:
        return
    pool = client.connection_pool
    connection = pool.get_connection()
    payload = connection.pack_commands(commands)

    def send() -> None:
        connection.send_packed_command(payload)
        first_error: Exception | None = None
        for number in range(len(commands)):
            try:
                connection.read_response()
            except ResponseError as exc:  # read the other replies: the connection stays usable
                first_error = first_error or ResponseError(f"command #{number + 1} ({commands[number][0]}): {exc}")
        if first_error is not None:
            raise first_error

    try:
        connection.retry.call_with_retry(send, lambda _error: connection.disconnect())
    finally:
        pool.release(connection)


class OnlineWriter:
    """Writes feature rows into Feast's Redis online store, every view of a batch in one pipeline.

    The layout is Feast's own (``RedisOnlineStore.online_write_batch``): one hash
    per entity key, field ``mmh3(view:feature)`` -> serialized ValueProto and
    ``_ts:view`` -> serialized Timestamp, so ``get_online_features`` reads it
    unchanged (tests check that). Doing it here saves Feast's per-row hashing
    and its timestamp read-back round trip; the flows' writes are overwrites
    whose final value does not depend on order, so that check is not needed.
    """

    def __init__(self, settings: Settings, client: Any = None) -> None:
        import redis
        from feast.infra.online_stores.helpers import _mmh3, _redis_key
        from feast.infra.online_stores.redis import _versioned_fv_name

        self.config = repo_config(settings)
        self.project = self.config.project
        self.client = client or redis.Redis.from_url(settings.redis.url, socket_timeout=5.0)
        self._redis_key = _redis_key
        self.views: dict[str, FeatureView] = {view.name: view for view in defs.FEATURE_VIEWS}
        self._fields: dict[str, list[tuple[str, Callable[[Any], bytes], bytes]]] = {}
        self._ts_field: dict[str, str] = {}
        for view in defs.FEATURE_VIEWS:
            name = _versioned_fv_name(view, self.config)
            self._fields[view.name] = [(f.name, value_encoder(f.dtype), _mmh3(f"{name}:{f.name}"))
                                       for f in view.features]
            self._ts_field[view.name] = f"_ts:{name}"
        join_keys = {entity.name: entity.join_key for entity in defs.ENTITIES}
        self._join_key = {view.name: join_keys[view.entities[0]] for view in defs.FEATURE_VIEWS}
        self._keys: dict[tuple[str, str], bytes] = {}

    def entity_key(self, view_name: str, entity_id: str) -> bytes:
        join_key = self._join_key[view_name]
        cached = self._keys.get((join_key, entity_id))
        if cached is None:
            proto = EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(string_val=entity_id)])
            cached = self._redis_key(self.project, proto, entity_key_serialization_version=3)
            if len(self._keys) > 200_000:  # bounded: hot entities stay cached
                self._keys.clear()
            self._keys[(join_key, entity_id)] = cached
        return cached  # type: ignore[no-any-return]

    def commands(self, batches: dict[str, list[tuple[str, dict[str, Any], datetime | int]]]) -> list[tuple[Any, ...]]:
        """view name -> rows of (entity id, {feature: python value}, event time) -> HSET commands.

        The event time is a datetime or an int of epoch microseconds. Views of the
        same entity (user_profile, user_short_term, user_long_term) share Feast's
        hash, so an entity gets one HSET with the fields of all its views.
        """
        by_key: dict[bytes, list[Any]] = {}
        for view_name, rows in batches.items():
            fields, ts_field = self._fields[view_name], self._ts_field[view_name]
            for entity_id, values, ts in rows:
                key = self.entity_key(view_name, entity_id)
                args = by_key.get(key)
                if args is None:
                    args = by_key[key] = ["HSET", key]
                args += (ts_field, timestamp_bytes(ts if isinstance(ts, int) else _epoch_us(ts)))
                get = values.get
                for name, encode, hashed in fields:
                    value = get(name)
                    args += (hashed, _NULL if value is None else encode(value))
        return [tuple(args) for args in by_key.values()]

    def write_many(self, batches: dict[str, list[tuple[str, dict[str, Any], datetime | int]]]) -> None:
        """view name -> rows of (entity id, {feature: python value}, event time), one round trip."""
        execute_commands(self.client, self.commands(batches))

    def write(self, view_name: str, rows: list[tuple[str, dict[str, Any], datetime | int]]) -> None:
        self.write_many({view_name: rows})


def _epoch_us(ts: datetime) -> int:
    delta = ts - _EPOCH if ts.tzinfo else ts - _EPOCH.replace(tzinfo=None)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["apply"])
    parser.parse_args(argv)
    from serving.config import load_settings

    settings = load_settings()
    store = feature_store(settings)
    print(f"applied {len(defs.FEATURE_VIEWS)} feature views to project {project_name(settings)!r} "
          f"(registry {store.config.registry.path}) at {datetime.now(UTC):%H:%M:%S}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
