"""Model versions: artefacts on disk, the registry in Redis, and the live model every process loads.

In: a trained model and its metrics (from the trainer). Out: a folder
``<state_dir>/models/<version>/`` (weights, id maps, metrics) and a
``ModelVersion`` record in the Redis hash ``RedisKeys.model_registry()``
(``live`` -> version). The API, the catalog flow and the precompute flow use
``LiveModel``, which follows the ``live`` pointer and reloads on change.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from model.two_tower import TwoTowerModel
from schemas.models import ModelVersion
from serving.config import Settings

log = logging.getLogger(__name__)
LIVE = "live"


def new_version(now: datetime | None = None) -> str:
    """Sortable, unique and valid as part of a Milvus collection name."""
    now = now or datetime.now(UTC)
    return f"v{now:%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"


def models_dir(settings: Settings) -> Path:
    return Path(settings.stack.state_dir).resolve() / "models"


class ModelRegistry:
    """The registry hash in Redis: one field per version plus the ``live`` pointer."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.key = settings.keys.model_registry()
        self.redis = client or redis.Redis.from_url(settings.redis.url, socket_timeout=2.0)

    def put(self, entry: ModelVersion) -> None:
        self.redis.hset(self.key, f"version:{entry.version}", entry.to_json())

    def get(self, version: str) -> ModelVersion | None:
        raw = self.redis.hget(self.key, f"version:{version}")
        return ModelVersion.from_json(raw) if raw else None

    def live_version(self) -> str | None:
        raw = self.redis.hget(self.key, LIVE)
        return raw.decode() if raw else None

    def live(self) -> ModelVersion | None:
        version = self.live_version()
        return self.get(version) if version else None

    def versions(self) -> list[ModelVersion]:
        rows = self.redis.hgetall(self.key)
        entries = [ModelVersion.from_json(v) for k, v in rows.items() if k.startswith(b"version:")]
        return sorted(entries, key=lambda e: e.version, reverse=True)

    def set_live(self, version: str) -> str | None:
        """Move the live pointer; the previous live entry is marked retired. Returns the previous version."""
        previous = self.live_version()
        entry = self.get(version)
        if entry is None:
            raise KeyError(f"unknown model version {version!r}")
        pipe = self.redis.pipeline()
        pipe.hset(self.key, f"version:{version}", entry.model_copy(update={"status": "live"}).to_json())
        pipe.hset(self.key, LIVE, version)
        old = self.get(previous) if previous and previous != version else None
        if old is not None:
            pipe.hset(self.key, f"version:{previous}", old.model_copy(update={"status": "retired"}).to_json())
        pipe.execute()
        return previous

    def forget(self, version: str) -> None:
        self.redis.hdel(self.key, f"version:{version}")


def save_model(settings: Settings, model: TwoTowerModel) -> Path:
    folder = models_dir(settings) / model.version
    model.save(folder)
    return folder


def remove_artefacts(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class LiveModel:
    """The live model of this deployment, reloaded when the registry's ``live`` pointer moves.

    Call it to get the current model (or None before the first training). The
    registry is checked at most every ``reload_interval_s``; a failing Redis
    keeps the model already loaded. With ``background=True`` (the serving
    path, where it is called on the event loop) a due check runs in a thread
    of its own and the call returns the model already loaded at once: a
    registry read or a model load (~50 ms, more on a loaded machine) never
    holds up the requests in flight. Call :meth:`refresh` once first so the
    first requests find the model.
    """

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None, background: bool = False,
                 load_ranker: Callable[[Path], Any] | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)
        self.model: TwoTowerModel | None = None
        # The heavy ranker saved with the same version (``load_ranker``, e.g. HeavyRanker.load), swapped in with it.
        self.ranker: Any = None
        self.entry: ModelVersion | None = None
        self.background = background
        self.load_ranker = load_ranker
        self._checked = 0.0
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()  # held by the one background refresh in flight

    def __call__(self) -> TwoTowerModel | None:
        if time.monotonic() - self._checked >= self.settings.model.reload_interval_s:
            if self.background:
                self._refresh_in_background()
            else:
                self.refresh()
        return self.model

    def _refresh_in_background(self) -> None:
        # Callers on several threads (the candidate sources) may find the check due at once:
        # the non-blocking acquire lets exactly one of them start the refresh.
        if not self._refreshing.acquire(blocking=False):
            return
        self._checked = time.monotonic()

        def run() -> None:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 (the loaded model keeps serving)
                log.exception("model_refresh_failed")
            finally:
                self._refreshing.release()

        try:
            threading.Thread(target=run, name="live-model-refresh", daemon=True).start()
        except RuntimeError:  # no thread could be started (resources): the next due check tries again
            self._refreshing.release()
            log.warning("model_refresh_not_started", exc_info=True)

    def refresh(self) -> bool:
        """Load the live version if it changed; True when a new model was loaded."""
        with self._lock:
            self._checked = time.monotonic()
            try:
                entry = self.registry.live()
            except redis.RedisError as exc:
                log.warning("model_registry_unreachable error=%s", exc)
                return False
            if entry is None or (self.entry is not None and entry.version == self.entry.version):
                return False
            try:
                model = TwoTowerModel.load(Path(entry.artefacts))
            except OSError as exc:
                log.error("model_load_failed version=%s error=%s", entry.version, exc)
                return False
            ranker = None
            if self.load_ranker is not None:
                try:
                    ranker = self.load_ranker(Path(entry.artefacts))
                except Exception:  # noqa: BLE001 (the two-tower still goes live; the light order stands)
                    log.exception("ranker_load_failed version=%s", entry.version)
            self.model, self.ranker, self.entry = model, ranker, entry
            log.info("model_loaded version=%s", entry.version)
            return True
