"""What candidate sources read: a vector index and behavioural signals, each behind one interface.

Real backends: ``infra.milvus.MilvusItemIndex`` and ``RedisSignals`` (ZSETs
written by the features flow). In-memory backends (``MemoryItemIndex``,
``MemorySignals``) give exact answers for offline evaluation and unit tests,
with the same filter semantics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import redis

from infra.milvus import SearchFilter
from schemas.catalog import ItemRecord, ItemStatus
from serving.config import Settings


class ItemIndex(Protocol):
    """``timeout_s``: the caller's deadline for this one call (None: the backend's default)."""

    name: str

    def search(self, vector: np.ndarray, k: int, flt: SearchFilter | None = None,
               timeout_s: float | None = None) -> list[tuple[str, float]]: ...

    def search_many(self, vectors: Sequence[np.ndarray], k: int, flt: SearchFilter | None = None,
                    timeout_s: float | None = None) -> list[list[tuple[str, float]]]: ...

    def search_each(self, vector: np.ndarray, wants: Sequence[tuple[SearchFilter, int]],
                    timeout_s: float | None = None) -> list[list[tuple[str, float]]]:
        """One vector, several (filter, k): each answer as ``search(vector, k, filter)`` gives it."""
        ...

    def vectors(self, item_ids: Sequence[str], timeout_s: float | None = None) -> dict[str, np.ndarray]: ...


class Signals(Protocol):
    def neighbours(self, item_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]: ...

    def trending(self, region: str | None, k: int) -> list[tuple[str, float]]: ...


class MemoryItemIndex:
    """Exact inner-product search over vectors held in memory (evaluation, tests, 'exact' in benches)."""

    name = "memory"

    def __init__(self, items: Sequence[ItemRecord], vectors: np.ndarray, cold: Sequence[bool]) -> None:
        keep = [i for i, item in enumerate(items) if item.status == ItemStatus.active]
        self.ids = [items[i].item_id for i in keep]
        self.matrix = np.ascontiguousarray(vectors[keep], dtype=np.float32)
        self.position = {item_id: i for i, item_id in enumerate(self.ids)}
        self.category = np.array([items[i].category or "" for i in keep], dtype=object)
        self.regions = [set(items[i].regions or []) for i in keep]
        self.published = np.array([int(items[i].published_at.timestamp()) if items[i].published_at else 0
                                   for i in keep], dtype=np.int64)
        self.cold = np.array([cold[i] for i in keep], dtype=bool)

    def _mask(self, flt: SearchFilter) -> np.ndarray | None:
        mask = None
        if flt.category is not None:
            mask = self.category == flt.category
        if flt.categories:
            wanted = np.isin(self.category, list(flt.categories))
            mask = wanted if mask is None else mask & wanted
        if flt.region is not None:
            region = np.array([flt.shown(r) for r in self.regions], dtype=bool)
            mask = region if mask is None else mask & region
        if flt.fresh_since is not None:
            fresh = (self.published >= flt.fresh_since) | self.cold
            mask = fresh if mask is None else mask & fresh
        return mask

    def search(self, vector: np.ndarray, k: int, flt: SearchFilter | None = None,
               timeout_s: float | None = None) -> list[tuple[str, float]]:
        flt = flt or SearchFilter()
        scores = self.matrix @ np.asarray(vector, dtype=np.float32)
        mask = self._mask(flt)
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        for item_id in flt.exclude:
            if item_id in self.position:
                scores[self.position[item_id]] = -np.inf
        k = min(k, len(scores))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self.ids[j], float(scores[j])) for j in top if np.isfinite(scores[j])]

    def search_many(self, vectors: Sequence[np.ndarray], k: int, flt: SearchFilter | None = None,
                    timeout_s: float | None = None) -> list[list[tuple[str, float]]]:
        return [self.search(v, k, flt, timeout_s) for v in vectors]

    def search_each(self, vector: np.ndarray, wants: Sequence[tuple[SearchFilter, int]],
                    timeout_s: float | None = None) -> list[list[tuple[str, float]]]:
        return [self.search(vector, k, flt, timeout_s) for flt, k in wants]

    def vectors(self, item_ids: Sequence[str], timeout_s: float | None = None) -> dict[str, np.ndarray]:
        return {i: self.matrix[self.position[i]] for i in item_ids if i in self.position}


class MemorySignals:
    """Co-visitation and trending from dicts (evaluation, unit tests)."""

    def __init__(self, neighbours: Mapping[str, Sequence[tuple[str, float]]] | None = None,
                 trending: Mapping[str | None, Sequence[tuple[str, float]]] | None = None) -> None:
        self._neighbours = neighbours or {}
        self._trending = trending or {}

    def neighbours(self, item_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        return [list(self._neighbours.get(item_id, ()))[:k] for item_id in item_ids]

    def trending(self, region: str | None, k: int) -> list[tuple[str, float]]:
        return list(self._trending.get(region, ()))[:k]


class RedisSignals:
    """Reads the ZSETs the features flow writes (never writes them): co-visitation and trending."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.keys = settings.keys
        self.client = client or redis.Redis.from_url(
            settings.redis.url, socket_timeout=settings.retrieval.source_timeout_s,
            socket_connect_timeout=settings.retrieval.source_timeout_s,
        )

    def neighbours(self, item_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        pipe = self.client.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.zrevrange(self.keys.item_neighbours(item_id), 0, k - 1, withscores=True)
        return [[(m.decode(), float(s)) for m, s in rows] for rows in pipe.execute()]

    def trending(self, region: str | None, k: int) -> list[tuple[str, float]]:
        rows = self.client.zrevrange(self.keys.trending(region), 0, k - 1, withscores=True)
        return [(m.decode(), float(s)) for m, s in rows]
