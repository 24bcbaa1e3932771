"""Retrieval benchmark: latency per candidate source and merged, ANN recall, training time, memory.

    python -m bench.retrieval                       # 100k synthetic items (a few minutes)
    python -m bench.retrieval --sizes 100000,1000000  # + 1M (HNSW build alone ~4-5 min on 2 cores)
    python -m bench.retrieval --skip-train          # leave out the MovieLens training timing

In: synthetic items of the model's dimension (clustered unit vectors with
category, regions and published_at), written into a real Milvus collection
built exactly as a model version's (infra/milvus.py), plus synthetic trending
and co-visitation ZSETs in Redis. Out: printed figures and
bench/results/retrieval.json:
- p50/p99 per source (each alone, sequential) and of the merged ``generate()``;
- ANN recall@100 and @500 against exact brute-force search;
- insert rate, index build time, Milvus RSS growth while the collection loads;
- two-tower training time on MovieLens-100K (CPU) and its offline recall
  (time-ordered 80/20, from model.evaluate).
The collections and Redis keys it creates are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis

from bench._common import save
from infra.milvus import (
    MilvusItemIndex,
    connect,
    create_item_collection,
    drop_collection,
    item_rows,
)
from model.evaluate import ann_recall_vs_exact
from schemas.catalog import ItemRecord
from serving.candidates import CandidateGenerator, MemoryItemIndex, RedisSignals
from serving.config import Settings, load_settings
from serving.pipeline.types import UserContext

CATEGORIES = [f"cat{i:02d}" for i in range(20)]
REGIONS = ["eu", "us", "asia", "latam"]


def milvus_rss_mb() -> float | None:
    """Resident memory of the Milvus server process (Linux /proc), in MB."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if text.startswith("Name:\tmilvus\n"):
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    return None


def synthetic(n: int, dim: int, seed: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Unit vectors shaped like trained embeddings (low intrinsic dimension, clustered), and scalar fields.

    Uniform noise in 64 dimensions would make every neighbour nearly tied, a
    much harder (and unrealistic) case for any ANN index.
    """
    rng = np.random.default_rng(seed)
    latent = 16
    centres = rng.normal(size=(max(n // 500, 20), latent)).astype(np.float32)
    points = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.normal(size=(n, latent)).astype(np.float32)
    vectors = points @ rng.normal(size=(latent, dim)).astype(np.float32)
    vectors += 0.05 * np.linalg.norm(vectors, axis=1, keepdims=True) * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    fields = {
        "category": rng.integers(len(CATEGORIES), size=n),
        "region": rng.integers(len(REGIONS) + 2, size=n),  # >= len(REGIONS): everywhere
        "published": rng.integers(int(datetime(2015, 1, 1, tzinfo=UTC).timestamp()),
                                  int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()), size=n),
    }
    return vectors.astype(np.float32), fields


def records(fields: dict[str, np.ndarray], start: int, stop: int) -> list[ItemRecord]:
    return [
        ItemRecord(item_id=f"s{i}", category=CATEGORIES[fields["category"][i]],
                   regions=[REGIONS[fields["region"][i]]] if fields["region"][i] < len(REGIONS) else None,
                   published_at=datetime.fromtimestamp(int(fields["published"][i]), UTC))
        for i in range(start, stop)
    ]


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(samples_ms, 50)), 2),
            "p99_ms": round(float(np.percentile(samples_ms, 99)), 2), "n": len(samples_ms)}


def wait_indexed(client, name: str, n: int, timeout_s: float = 1800) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        info = client.describe_index(name, "embedding")
        if int(info.get("indexed_rows", 0)) >= n and int(info.get("pending_index_rows", 0)) == 0:
            break
        time.sleep(1.0)
    return time.perf_counter() - started


def bench_size(settings: Settings, n: int, requests: int) -> dict[str, object]:
    dim = settings.model.dim
    name = f"bench_retrieval_{n}_{uuid.uuid4().hex[:6]}"
    settings = settings.model_copy(deep=True)
    settings.retrieval.serving_alias = name  # search the collection itself
    settings.redis.key_prefix = f"bench:{uuid.uuid4().hex[:6]}:"
    settings.__dict__.pop("keys", None)
    vectors, fields = synthetic(n, dim)
    client = connect(settings)
    client_timeout = settings.model_copy(deep=True)
    out: dict[str, object] = {"items": n, "dim": dim}
    try:
        rss_before = milvus_rss_mb()
        create_item_collection(client, name, dim, settings)
        started = time.perf_counter()
        batch = 5000
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            client.insert(name, item_rows(records(fields, start, stop), vectors[start:stop], [False] * (stop - start)))
        client.flush(name)
        out["insert_rows_per_s"] = round(n / (time.perf_counter() - started))
        out["index_build_s"] = round(wait_indexed(client, name, n), 1)
        client.load_collection(name)
        rss_loaded = milvus_rss_mb()
        if rss_before is not None and rss_loaded is not None:
            # Growth of the server while it holds the loaded collection (other tenants' load is noise).
            out["milvus_rss_mb"] = {"before": round(rss_before), "loaded": round(rss_loaded),
                                    "delta": round(rss_loaded - rss_before)}
        out["raw_vectors_mb"] = round(n * dim * 4 / 2**20, 1)
        print(f"[{n}] inserted {out['insert_rows_per_s']} rows/s, index {out['index_build_s']} s, rss {out.get('milvus_rss_mb')}")

        rng = np.random.default_rng(2)
        picks = rng.integers(n, size=requests)
        queries = vectors[picks] + 0.1 * rng.normal(size=(requests, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        ann = MilvusItemIndex(client_timeout)
        exact = ExactIndex(vectors)
        out["ann_recall@100"] = round(ann_recall_vs_exact(ann, exact, queries[:100], k=100), 4)
        out["ann_recall@500"] = round(ann_recall_vs_exact(ann, exact, queries[:50], k=500), 4)
        print(f"[{n}] ANN recall@100 {out['ann_recall@100']}, @500 {out['ann_recall@500']}")

        r = redis.Redis.from_url(settings.redis.url)
        pipe = r.pipeline()
        pipe.zadd(settings.keys.trending(None), {f"s{i}": float(1000 - j) for j, i in enumerate(rng.integers(n, size=1000))})
        for region in REGIONS:
            pipe.zadd(settings.keys.trending(region), {f"s{i}": float(500 - j) for j, i in enumerate(rng.integers(n, size=500))})
        for i in picks[:requests]:
            pipe.zadd(settings.keys.item_neighbours(f"s{i}"), {f"s{j}": float(200 - k) for k, j in enumerate(rng.integers(n, size=200))})
        pipe.execute()

        class QueryModel:
            """Stands in for the user tower: the bench's query vector for this user (no torch cost here)."""

            def encode_user(self, ctx: UserContext) -> np.ndarray:
                return queries[int(ctx.user_id)]

        generator = CandidateGenerator(settings.retrieval, QueryModel, ann, RedisSignals(settings))
        contexts = [UserContext(user_id=str(q), region=REGIONS[q % len(REGIONS)],
                                recent=[(f"s{picks[q]}", "click", 0.0)], consumed={f"s{picks[q]}"},
                                category_affinity={CATEGORIES[q % 20]: 2.0, CATEGORIES[(q + 1) % 20]: 1.0},
                                now=datetime(2026, 1, 1, tzinfo=UTC)) for q in range(requests)]
        per_source: dict[str, list[float]] = {name: [] for name in settings.retrieval.quotas}
        errors: dict[str, int] = dict.fromkeys(settings.retrieval.quotas, 0)
        for ctx in contexts:
            request = generator.prepare(ctx)
            for source, k in settings.retrieval.quotas.items():
                started = time.perf_counter()
                try:
                    generator.sources[source](request, k)
                except Exception:  # noqa: BLE001 (a timeout under load is a result, counted)
                    errors[source] += 1
                per_source[source].append((time.perf_counter() - started) * 1000)
        out["per_source"] = {source: {**percentiles(samples), "errors": errors[source]}
                             for source, samples in per_source.items()}
        merged_ms, sizes = [], []

        async def run_merged() -> None:
            for ctx in contexts[:10]:  # warm-up: thread pool, connections
                await generator.generate(ctx)
            for ctx in contexts:
                started = time.perf_counter()
                candidates = await generator.generate(ctx)
                merged_ms.append((time.perf_counter() - started) * 1000)
                sizes.append(len(candidates))

        asyncio.run(run_merged())
        out["merged"] = {**percentiles(merged_ms), "mean_candidates": round(float(np.mean(sizes)), 1),
                         "budget_ms": settings.retrieval.total_timeout_s * 1000}
        for source, figures in out["per_source"].items():
            print(f"[{n}] {source:16} p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms")
        print(f"[{n}] merged           p50 {out['merged']['p50_ms']:7.2f} ms  p99 {out['merged']['p99_ms']:7.2f} ms "
              f"({out['merged']['mean_candidates']} candidates)")
        keys = r.keys(settings.redis.key_prefix + "*")
        if keys:
            r.delete(*keys)
    finally:
        drop_collection(client, name)
        client.close()
    return out


class ExactIndex(MemoryItemIndex):
    """Brute-force truth over the raw vectors (no scalar fields needed for recall)."""

    def __init__(self, vectors: np.ndarray) -> None:  # noqa: D107
        self.ids = [f"s{i}" for i in range(len(vectors))]
        self.matrix = vectors
        self.position = {}


def bench_training(settings: Settings) -> dict[str, object]:
    from model.evaluate import evaluate_movielens

    report = evaluate_movielens(settings, stride=5)
    print(f"training on MovieLens-100K (80%): {report['train_seconds']} s; recall@500 merged "
          f"{report['metrics']['recall@500_merged']}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000", help="comma-separated catalogue sizes")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args(argv)
    settings = load_settings()
    result: dict[str, object] = {"quotas": settings.retrieval.quotas,
                                 "hnsw": {"M": settings.retrieval.hnsw_m, "efConstruction": settings.retrieval.hnsw_ef_construction,
                                          "ef_search": settings.retrieval.ef_search}}
    result["sizes"] = [bench_size(settings, int(n), args.requests) for n in args.sizes.split(",")]
    # Latencies on a shared 2-core machine depend on what else runs: keep the load beside them.
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if not args.skip_train:
        result["training"] = bench_training(settings)
    save("retrieval", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
