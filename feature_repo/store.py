"""Build the Feast store from Settings, apply the definitions, and write rows fast.

    python -m feature_repo.store apply   # what `feast apply` does, for the configured project

Flows write through ``OnlineWriter``: protobuf rows straight into Feast's Redis
online store (``online_write_batch``), skipping the DataFrame round trip of
``store.push`` (6.5 ms per call). Rows are only written when their timestamp is
newer than the stored one, so a replay after a crash cannot move a value back.
"""

from __future__ import annotations

import argparse
import fcntl
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from feast import FeatureStore, FeatureView, RepoConfig
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import DoubleList, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Array, Float64, Int64, String

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


def _value(dtype: Any, value: Any) -> ValueProto:
    if value is None:
        return ValueProto()
    if dtype == String:
        return ValueProto(string_val=str(value))
    if dtype == Int64:
        return ValueProto(int64_val=int(value))
    if dtype == Float64:
        return ValueProto(double_val=float(value))
    if dtype == Array(String):
        return ValueProto(string_list_val=StringList(val=[str(v) for v in value]))
    if dtype == Array(Float64):
        return ValueProto(double_list_val=DoubleList(val=[float(v) for v in value]))
    raise TypeError(f"no proto mapping for {dtype}")


class OnlineWriter:
    """Writes feature rows into the Feast Redis online store, many rows per round trip."""

    def __init__(self, settings: Settings) -> None:
        self.config = repo_config(settings)
        self.store = RedisOnlineStore()
        self.views: dict[str, FeatureView] = {view.name: view for view in defs.FEATURE_VIEWS}
        self._dtypes = {view.name: {f.name: f.dtype for f in view.features} for view in defs.FEATURE_VIEWS}

    def write(self, view_name: str, rows: list[tuple[str, dict[str, Any], datetime]]) -> None:
        """rows: (entity id, {feature: python value}, event timestamp)."""
        if not rows:
            return
        view = self.views[view_name]
        join_key = view.entity_columns[0].name if view.entity_columns else f"{view.entities[0]}_id"
        dtypes = self._dtypes[view_name]
        data = []
        for entity_id, values, ts in rows:
            key = EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(string_val=entity_id)])
            protos = {name: _value(dtypes[name], values.get(name)) for name in dtypes}
            data.append((key, protos, ts, None))
        self.store.online_write_batch(self.config, view, data, None)


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
