"""Synthetic item catalogues (100k, 1M items) for benchmarks, built once and shared between them.

    from bench.synthetic import drop_synthetic_catalog, ensure_synthetic_catalog, synthetic_settings
    from serving.config import load_settings

    settings = synthetic_settings(load_settings())        # Redis prefix "benchsyn:" (optional, recommended)
    catalog = ensure_synthetic_catalog(settings, 1_000_000, seed=1)
    settings.retrieval.serving_alias = catalog.alias      # MilvusItemIndex / the API now search it
    # API processes: RECSYS_REDIS__KEY_PREFIX=benchsyn: RECSYS_RETRIEVAL__SERVING_ALIAS=<catalog.alias>
    catalog.item_id(7), catalog.item_ids[:10]             # "syn7"; ids are syn0 .. syn<n-1>
    catalog.vectors()                                     # the exact float32 vectors (n x dim), for recall truth
    catalog.fields                                        # numpy columns: category, region, published_at, ...
    catalog.build                                         # what this call did: seconds, rows/s, built_now
    drop_synthetic_catalog(settings, 1_000_000, seed=1)   # or `python -m bench.synthetic --drop [--seed 1]`

In: a running Milvus and Redis (`make up`). Out, for (n_items, seed, dim):
- Milvus collection ``benchsyn_items_<n>_s<seed>_d<dim>`` with the real
  collection's schema and indexes (infra/milvus.create_item_collection:
  vector index from settings.retrieval, Trie on category, sort on
  published_at), loaded, behind the alias ``benchsyn_serving_<n>_s<seed>``;
- under ``settings.redis.key_prefix``: one ItemFeatures document per item
  (what the ranking and policy stages read), trending ZSETs (global and one
  per region of demo.movielens.REGIONS, the regions synthetic users should
  have) and co-visitation neighbours for the first ``COVISIT_ITEMS`` items
  (give synthetic users histories inside that range).

Vectors are unit vectors shaped like trained embeddings: clustered, with a
low intrinsic dimension (uniform noise in 64 dimensions would make every
neighbour nearly tied: an unrealistically hard case for any ANN index).
Documents are keyed by item id only (syn0 is syn0 in every size): keep one
seed per Redis prefix. Everything is a pure function of (n, seed, dim): a second call reuses what
is there (checked: row count, vector index type and parameters, first and
last document) and only rebuilds the part that is missing or different, so
the retrieval and latency benchmarks of one `make bench` build the 1M
catalogue once. Catalogues are kept between runs (a 1M build takes minutes
on 2 cores) and released (unloaded from Milvus memory) by
``release_synthetic_catalogs`` at the end of a run; drop them to free disk
and Redis memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, overload

import numpy as np
import orjson
import redis

from demo.movielens import REGIONS
from infra.milvus import (
    PK,
    VECTOR,
    alias_target,
    connect,
    create_item_collection,
    create_vector_index,
    rows_from_columns,
    swap_alias,
    vector_index_params,
)
from schemas.features import ItemFeatures
from serving.config import Settings

PREFIX = "benchsyn"
# MovieLens genres: the same category names the demo catalogue uses.
CATEGORIES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
              "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
              "Western"]
LANGUAGES = ["en", "en", "en", "es", "fr", "de"]
RATINGS = ["G", "PG", "PG-13", "R"]
# Items syn0 .. syn<COVISIT_ITEMS-1> get co-visitation neighbours (synthetic histories should live there).
COVISIT_ITEMS = 2000
TRENDING_SIZE = 1000
PUBLISHED_FROM = int(datetime(2015, 1, 1, tzinfo=UTC).timestamp())
PUBLISHED_TO = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())
INSERT_BATCH = 20_000
# Collection property holding the figures of the build that made it (reused catalogues report them).
BUILD_PROPERTY = "benchsyn.build"
# Documents per MSET: one command holds Redis for its whole length (~10 ms at 5,000).
DOC_BATCH = 5_000


def item_id(n: int) -> str:
    return f"syn{n}"


class ItemIds(Sequence[str]):
    """syn0 .. syn<n-1> without holding a million strings."""

    def __init__(self, n: int) -> None:  # noqa: D107
        self.n = n

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [item_id(j) for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return item_id(i % self.n)


def synthetic_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """n unit vectors (float32): clusters of ~500 items in a 16-dimensional subspace, plus a little noise."""
    rng = np.random.default_rng(seed)
    latent = 16
    centres = rng.normal(size=(max(n // 500, 20), latent)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    projection = rng.normal(size=(latent, dim)).astype(np.float32)
    for lo in range(0, n, 100_000):  # blocks: peak memory stays ~n x dim x 4 bytes
        hi = min(n, lo + 100_000)
        points = centres[rng.integers(len(centres), size=hi - lo)] + 0.5 * rng.normal(size=(hi - lo, latent)).astype(np.float32)
        block = points @ projection
        block += 0.05 * np.linalg.norm(block, axis=1, keepdims=True) * rng.normal(size=(hi - lo, dim)).astype(np.float32) / np.sqrt(dim)
        out[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def synthetic_fields(n: int, seed: int) -> dict[str, np.ndarray]:
    """Scalar columns: indexes into CATEGORIES / LANGUAGES / RATINGS / REGIONS, epoch seconds published."""
    rng = np.random.default_rng(seed + 1_000_003)
    return {
        "category": rng.integers(len(CATEGORIES), size=n),
        "language": rng.integers(len(LANGUAGES), size=n),
        "maturity": rng.choice(len(RATINGS), size=n, p=[0.3, 0.3, 0.3, 0.1]),
        # Half the items are shown everywhere (-1); the others in one region.
        "region": np.where(rng.random(n) < 0.5, -1, rng.integers(len(REGIONS), size=n)),
        "published_at": rng.integers(PUBLISHED_FROM, PUBLISHED_TO, size=n),
        # Zipf-like popularity: drives trending and the documents' counters.
        "popularity": (rng.pareto(1.2, size=n) * 10).astype(np.int64),
    }


@dataclass
class SyntheticCatalog:
    """One synthetic catalogue: names to search it by and its data (regenerated from the seed on demand)."""

    n_items: int
    seed: int
    dim: int
    build: dict[str, Any] = field(default_factory=dict)

    @property
    def collection(self) -> str:
        return f"{PREFIX}_items_{self.n_items}_s{self.seed}_d{self.dim}"

    @property
    def alias(self) -> str:
        return f"{PREFIX}_serving_{self.n_items}_s{self.seed}"

    @property
    def item_ids(self) -> ItemIds:
        return ItemIds(self.n_items)

    @staticmethod
    def item_id(n: int) -> str:
        return item_id(n)

    def vectors(self) -> np.ndarray:
        return synthetic_vectors(self.n_items, self.dim, self.seed)

    @cached_property
    def fields(self) -> dict[str, np.ndarray]:
        return synthetic_fields(self.n_items, self.seed)

    def regions(self, i: int) -> list[str]:
        r = int(self.fields["region"][i])
        return [] if r < 0 else [REGIONS[r]]

    def document(self, i: int) -> dict[str, Any]:
        """The ItemFeatures document of item i (JSON-ready)."""
        f = self.fields
        pop = int(f["popularity"][i])
        return {"item_id": item_id(i), "category": CATEGORIES[f["category"][i]],
                "tags": [CATEGORIES[f["category"][i]]], "language": LANGUAGES[f["language"][i]],
                "regions": self.regions(i) or None, "status": "active", "published_at": float(f["published_at"][i]),
                "maturity_rating": RATINGS[f["maturity"][i]], "views": pop * 3, "clicks": pop, "watches": pop // 2,
                "likes": pop // 4, "skips": pop // 10, "impressions": pop * 20, "watch_seconds": float(pop * 300),
                "ctr": (pop + 1.0) / (pop * 20 + 31.0), "trending_score": float(np.log1p(pop)), "stats_as_of": 0.0,
                "updated_at": "2026-11-01T00:00:00+00:00"}

    def documents(self, lo: int, hi: int) -> list[bytes]:
        """``document(i)`` for i in [lo, hi) as JSON bytes, built from whole columns (the same bytes, ~2x faster)."""
        f = self.fields
        categories = [CATEGORIES[c] for c in f["category"][lo:hi].tolist()]
        languages = [LANGUAGES[c] for c in f["language"][lo:hi].tolist()]
        regions = [None if r < 0 else [REGIONS[r]] for r in f["region"][lo:hi].tolist()]
        published = f["published_at"][lo:hi].astype(np.float64).tolist()
        ratings = [RATINGS[c] for c in f["maturity"][lo:hi].tolist()]
        popularity = f["popularity"][lo:hi]
        trending = np.log1p(popularity).astype(np.float64).tolist()
        dumps = orjson.dumps
        return [dumps({"item_id": item_id(i), "category": c, "tags": [c], "language": lang, "regions": r,
                       "status": "active", "published_at": p, "maturity_rating": m, "views": pop * 3, "clicks": pop,
                       "watches": pop // 2, "likes": pop // 4, "skips": pop // 10, "impressions": pop * 20,
                       "watch_seconds": float(pop * 300), "ctr": (pop + 1.0) / (pop * 20 + 31.0), "trending_score": t,
                       "stats_as_of": 0.0, "updated_at": "2026-11-01T00:00:00+00:00"})
                for i, c, lang, r, p, m, pop, t in zip(range(lo, hi), categories, languages, regions, published,
                                                       ratings, popularity.tolist(), trending, strict=True)]

    def columns(self, lo: int, hi: int, vectors: np.ndarray) -> dict[str, Any]:
        """Rows lo..hi as columns (field name -> values; the vectors stay one float32 array): what ``rows`` holds."""
        f = self.fields
        return {PK: self.item_ids[lo:hi], VECTOR: np.asarray(vectors, dtype=np.float32),
                "category": [CATEGORIES[c] for c in f["category"][lo:hi].tolist()],
                "language": [LANGUAGES[c] for c in f["language"][lo:hi].tolist()],
                "regions": [[] if r < 0 else [REGIONS[r]] for r in f["region"][lo:hi].tolist()],
                "status": ["active"] * (hi - lo), "published_at": f["published_at"][lo:hi].tolist(),
                "maturity_rating": [RATINGS[c] for c in f["maturity"][lo:hi].tolist()], "cold": [False] * (hi - lo)}

    def rows(self, lo: int, hi: int, vectors: np.ndarray) -> list[dict[str, Any]]:
        f = self.fields
        return rows_from_columns(
            self.item_ids[lo:hi], vectors,
            category=[CATEGORIES[c] for c in f["category"][lo:hi]],
            language=[LANGUAGES[c] for c in f["language"][lo:hi]],
            regions=[self.regions(i) for i in range(lo, hi)],
            status=["active"] * (hi - lo),
            published_at=f["published_at"][lo:hi].tolist(),
            maturity_rating=[RATINGS[c] for c in f["maturity"][lo:hi]],
            cold=[False] * (hi - lo),
        )


def synthetic_settings(settings: Settings) -> Settings:
    """A copy of settings whose Redis keys live under ``benchsyn:`` (isolated from the demo's)."""
    s = settings.model_copy(deep=True)
    s.redis.key_prefix = f"{PREFIX}:"
    s.__dict__.pop("keys", None)  # cached RedisKeys of the old prefix
    return s


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[synthetic] {message}", flush=True)


def _index_matches(client: Any, name: str, settings: Settings) -> bool:
    wanted = vector_index_params(settings)
    try:
        info = client.describe_index(name, VECTOR)
    except Exception:  # noqa: BLE001 (no index: rebuild)
        return False
    if info.get("index_type") != wanted["index_type"]:
        return False
    params = orjson.loads(info["params"]) if isinstance(info.get("params"), str) else info.get("params") or {}
    flat = {**info, **params}
    return all(str(flat.get(k)) == str(v) for k, v in wanted["params"].items())


def _wait_indexed(client: Any, name: str, n: int, timeout_s: float = 1800, settle_s: float = 600) -> float:
    """Wait until every row is indexed, then (up to settle_s) for compaction's re-indexing; returns the latter."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.describe_index(name, VECTOR)
        if info.get("state") == "Failed":
            raise RuntimeError(f"{name}: vector index build failed: {info}")
        if int(info.get("indexed_rows", 0)) >= n and info.get("state", "Finished") == "Finished":
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: vector index not built after {timeout_s:.0f} s")
        time.sleep(1.0)
    # Compaction merges the sealed segments of a fresh bulk load and indexes the merged ones again
    # (minutes at 1M on 2 cores, DESIGN.md): latency measured meanwhile would measure that instead.
    started = time.monotonic()
    while int(client.describe_index(name, VECTOR).get("pending_index_rows", 0)) > 0:
        if time.monotonic() - started > settle_s:
            break
        time.sleep(2.0)
    return time.monotonic() - started


def _segment_rows(client: Any, name: str) -> list[int] | None:
    """Rows of each flushed segment, largest first (how the bulk load was sealed and compacted)."""
    try:
        return sorted((int(s.num_rows) for s in client.list_persistent_segments(name)), reverse=True)
    except Exception:  # noqa: BLE001 (a figure for the record only; an older server may lack the call)
        return None


def _earlier_build(client: Any, name: str, default: Any) -> Any:
    """The figures the build that made this collection stored (None for one built before they were kept)."""
    raw = (client.describe_collection(name).get("properties") or {}).get(BUILD_PROPERTY)
    return json.loads(raw) if raw else default


def _column_inserter(settings: Settings, name: str) -> Callable[[dict[str, Any]], Any]:
    """insert(columns) into the collection, column-wise.

    MilvusClient.insert takes rows only, and turning a row dict into protobuf fields costs
    ~60 µs of Python per row (~60 s of a core for 1M rows, beside a server that needs both
    cores); pymilvus' ORM ``Collection.insert`` takes columns and costs ~15 µs a row.
    """
    import warnings

    from pymilvus import Collection, connections

    alias = f"{PREFIX}-insert-{os.getpid()}"
    # The ORM API is deprecated in pymilvus 3 (still there in the pinned 3.0): say so once, here.
    warnings.filterwarnings("ignore", message=".*ORM-style PyMilvus API")
    connections.connect(alias=alias, uri=settings.milvus.uri, timeout=settings.milvus.timeout_s)
    collection = Collection(name, using=alias)
    order = [f.name for f in collection.schema.fields]

    def insert(columns: dict[str, Any]) -> Any:
        return collection.insert([columns[name] for name in order], timeout=600)

    return insert


def _ensure_milvus(settings: Settings, catalog: SyntheticCatalog, progress: bool,
                   after_insert: Callable[[], None] | None = None, load: bool = True) -> None:
    client = connect(settings)
    name, n, build = catalog.collection, catalog.n_items, catalog.build
    try:
        rows = int(client.get_collection_stats(name).get("row_count", 0)) if client.has_collection(name) else -1
        if rows != n:
            if rows >= 0:
                if alias_target(client, catalog.alias) == name:
                    client.drop_alias(catalog.alias)  # (Milvus 2.3.5 keeps an alias past its collection's drop)
                client.drop_collection(name)
            started = time.perf_counter()
            create_item_collection(client, name, catalog.dim, settings, load=False, vector_index=False)
            vectors = catalog.vectors()
            build["vectors_s"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            insert = _column_inserter(settings, name)
            # Two inserts in flight: the client builds the next batch while the server takes this one.
            with ThreadPoolExecutor(2) as pool:
                pending = []
                for lo in range(0, n, INSERT_BATCH):
                    hi = min(n, lo + INSERT_BATCH)
                    pending.append(pool.submit(insert, catalog.columns(lo, hi, vectors[lo:hi])))
                    if len(pending) >= 2:
                        pending.pop(0).result()
                    if progress and (lo // INSERT_BATCH) % 10 == 9:
                        _log(progress, f"{name}: {hi:,}/{n:,} rows inserted")
                for f in pending:
                    f.result()
            client.flush(name, timeout=600)
            seconds = time.perf_counter() - started
            build.update(built_now=True, insert_s=round(seconds, 1), insert_rows_per_s=round(n / seconds),
                         segments_sealed=_segment_rows(client, name))
            _log(progress, f"{name}: {n:,} rows in {seconds:.0f} s ({n / seconds:,.0f} rows/s)")
            if after_insert is not None:
                after_insert()
            # Indexed once, after the bulk load: indexing each segment as it seals competed with
            # the inserts for the 2 cores (1M: 6.9k rows/s vs 9.5k without the index).
            # pymilvus' create_index returns when the build is done: that is the index time.
            started = time.perf_counter()
            create_vector_index(client, name, settings)
            build["index_build_s"] = round(time.perf_counter() - started, 1)
            _log(progress, f"{name}: vector index built in {build['index_build_s']} s")
        else:
            build["built_now"] = False
        rebuild_index = not _index_matches(client, name, settings)
        if rebuild_index:
            # Same rows, other vector index: rebuild the index only.
            client.release_collection(name)
            try:
                client.drop_index(name, VECTOR)
            except Exception:  # noqa: BLE001 (no index yet)
                pass
            started = time.perf_counter()
            create_vector_index(client, name, settings)
            build["index_build_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        build["compaction_wait_s"] = round(_wait_indexed(client, name, n), 1)
        build["index_wait_s"] = round(time.perf_counter() - started - build["compaction_wait_s"], 1)
        build["segments"] = _segment_rows(client, name)
        if load:
            started = time.perf_counter()
            client.load_collection(name, timeout=600)
            build["load_s"] = round(time.perf_counter() - started, 1)
        swap_alias(client, catalog.alias, name)
        build["index"] = vector_index_params(settings)
        if build["built_now"] or rebuild_index:
            figures = {k: build[k] for k in ("vectors_s", "insert_s", "insert_rows_per_s", "index_build_s",
                                             "segments_sealed", "segments") if k in build}
            figures.update(index_wait_s=build["index_wait_s"], compaction_wait_s=build["compaction_wait_s"],
                           index=build["index"], load_average_1_5_15=[round(x, 2) for x in os.getloadavg()],
                           date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if not build["built_now"]:  # index rebuilt only: the rows' insert figures are the earlier ones
                earlier = _earlier_build(client, name, {})
                figures.update({k: earlier[k] for k in ("vectors_s", "insert_s", "insert_rows_per_s") if k in earlier})
            client.alter_collection_properties(name, properties={BUILD_PROPERTY: json.dumps(figures)})
        else:
            build["earlier_build"] = _earlier_build(client, name, None)
        _log(progress, f"{name}: indexed (waited {build['index_wait_s']} s)"
             + (f", loaded in {build['load_s']} s" if load else ", not loaded"))
    finally:
        client.close()


def _ensure_redis(settings: Settings, catalog: SyntheticCatalog, progress: bool) -> None:
    r = redis.Redis.from_url(settings.redis.url)
    keys, n = settings.keys, catalog.n_items
    try:
        ItemFeatures.model_validate(catalog.document(0))  # the documents follow the schema the API reads
        if r.exists(keys.item_features(item_id(0)), keys.item_features(item_id(n - 1))) == 2:
            catalog.build["documents_written"] = 0
            return
        started = time.perf_counter()
        for lo in range(0, n, DOC_BATCH):
            hi = min(n, lo + DOC_BATCH)
            # One MSET per batch: ~5x less client work than a pipeline of SETs.
            r.mset(dict(zip((keys.item_features(item_id(i)) for i in range(lo, hi)), catalog.documents(lo, hi),
                            strict=True)))
        # Signals the candidate sources read: trending (global, per region) and co-visitation.
        pop = catalog.fields["popularity"]
        region = catalog.fields["region"]
        top = np.argsort(-pop, kind="stable")
        pipe = r.pipeline(transaction=False)
        pipe.delete(keys.trending(None))
        pipe.zadd(keys.trending(None), {item_id(int(i)): float(pop[i]) for i in top[:TRENDING_SIZE]})
        for k, name in enumerate(REGIONS):
            here = top[(region[top] == k) | (region[top] < 0)][:TRENDING_SIZE]
            pipe.delete(keys.trending(name))
            pipe.zadd(keys.trending(name), {item_id(int(i)): float(pop[i]) for i in here})
        rng = np.random.default_rng(catalog.seed + 7)
        for i in range(min(COVISIT_ITEMS, n)):
            # Neighbours near i in id space (same cluster often enough) and some popular items.
            near = (i + rng.integers(-500, 500, size=60)) % n
            neighbours = np.concatenate([near, top[rng.integers(min(n, 5000), size=40)]])
            pipe.delete(keys.item_neighbours(item_id(i)))
            pipe.zadd(keys.item_neighbours(item_id(i)),
                      {item_id(int(j)): float(w) for j, w in zip(neighbours, rng.random(len(neighbours)), strict=True)})
        pipe.execute()
        seconds = time.perf_counter() - started
        catalog.build.update(documents_written=n, documents_s=round(seconds, 1))
        _log(progress, f"{n:,} item documents + trending + co-visitation in Redis in {seconds:.0f} s")
    finally:
        r.close()


def ensure_synthetic_catalog(settings: Settings, n_items: int, *, seed: int = 1, progress: bool = True,
                             load: bool = True) -> SyntheticCatalog:
    """The (n_items, seed) catalogue in Milvus (indexed, loaded unless ``load=False``, behind its alias)
    and Redis; built if missing."""
    catalog = SyntheticCatalog(n_items=n_items, seed=seed, dim=settings.model.dim)
    started = time.perf_counter()
    # The documents are written while Milvus builds the vector index (Python here, Milvus'
    # threads there); not during the inserts, whose client side needs this process.
    with ThreadPoolExecutor(1) as pool:
        documents: list[Future[None]] = []

        def write_documents() -> None:
            if not documents:
                documents.append(pool.submit(_ensure_redis, settings, catalog, progress))

        _ensure_milvus(settings, catalog, progress, after_insert=write_documents, load=load)
        write_documents()
        documents[0].result()
    catalog.build["setup_s"] = round(time.perf_counter() - started, 1)
    return catalog


def drop_synthetic_catalog(settings: Settings, n_items: int | None = None, *, seed: int | None = None,
                           documents: bool | None = None) -> None:
    """Drop synthetic collections and aliases (all of them, or one size / seed).

    The Redis documents and signals under ``settings.redis.key_prefix`` are shared by every
    size (ids syn0..): by default they go only when everything is dropped; ``documents=True``
    drops them with one seed's collections (one seed per prefix, so they are that seed's).
    """
    client = connect(settings)
    try:
        for alias in client.list_aliases().get("aliases", []):
            if alias.startswith(f"{PREFIX}_serving_") and _matches(alias, n_items, seed):
                client.drop_alias(alias)
        for name in client.list_collections():
            if name.startswith(f"{PREFIX}_items_") and _matches(name, n_items, seed):
                client.release_collection(name)
                client.drop_collection(name)
    finally:
        client.close()
    if not (documents if documents is not None else n_items is None and seed is None):
        return
    r = redis.Redis.from_url(settings.redis.url)
    try:
        doomed = list(r.scan_iter(match=settings.keys.item_features("syn*"),
                                  count=10_000))
        doomed += [settings.keys.trending(None), *(settings.keys.trending(x) for x in REGIONS)]
        doomed += [settings.keys.item_neighbours(item_id(i)) for i in range(COVISIT_ITEMS)]
        for lo in range(0, len(doomed), 10_000):
            r.unlink(*doomed[lo:lo + 10_000])
    finally:
        r.close()


def _matches(name: str, n_items: int | None, seed: int | None) -> bool:
    parts = name.split("_")  # benchsyn_items_<n>_s<seed>[_d<dim>] / benchsyn_serving_<n>_s<seed>
    return (n_items is None or parts[2] == str(n_items)) and (seed is None or parts[3] == f"s{seed}")


def release_synthetic_catalogs(settings: Settings) -> list[str]:
    """Unload every synthetic collection from Milvus memory (kept on disk for the next run)."""
    client = connect(settings)
    try:
        names = [n for n in client.list_collections() if n.startswith(f"{PREFIX}_items_")]
        for name in names:
            client.release_collection(name)
        return names
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    from serving.config import load_settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000", help="comma-separated catalogue sizes to build")
    parser.add_argument("--seed", type=int, help="catalogue seed (default 1); with --drop: drop only this seed's")
    parser.add_argument("--drop", action="store_true",
                        help="drop the synthetic catalogues (every seed, or --seed's) and the documents under "
                             f"the {PREFIX}: prefix: the next build starts from scratch")
    parser.add_argument("--release", action="store_true", help="unload them from Milvus memory")
    parser.add_argument("--no-load", action="store_true",
                        help="build (or check) them but leave them unloaded: the retrieval benchmark loads them "
                             "when it measures Milvus memory, and `make bench` builds them this way")
    args = parser.parse_args(argv)
    settings = synthetic_settings(load_settings())
    if args.drop:
        drop_synthetic_catalog(settings, seed=args.seed, documents=True)
        print(f"dropped the synthetic catalogues{'' if args.seed is None else f' of seed {args.seed}'} "
              f"and the documents under {settings.redis.key_prefix}")
    elif args.release:
        print(f"released {release_synthetic_catalogs(settings)}")
    else:
        for n in (int(x) for x in args.sizes.split(",") if x):
            catalog = ensure_synthetic_catalog(settings, n, seed=1 if args.seed is None else args.seed,
                                               load=not args.no_load)
            print(f"{catalog.alias} -> {catalog.collection}: {catalog.build}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
