"""Retrieval benchmark: latency per candidate source and merged, ANN recall, training time, vector store memory.

    python -m bench.retrieval                         # 100k and 1M synthetic items (1M build: minutes, once)
    python -m bench.retrieval --sizes 100000          # 100k only
    python -m bench.retrieval --skip-train            # leave out the MovieLens training timing
    python -m bench.retrieval --drop                  # drop the synthetic catalogues afterwards

In: the stack's Milvus and Redis (`make up`) and the synthetic catalogues of
bench/synthetic.py (built on first use, then reused: the latency benchmark
reads the same ones), with the production vector index from
settings.retrieval (infra/milvus.vector_index_params). Out: printed figures
and bench/results/retrieval.json:
- build: rows inserted per second, seconds waiting for the vector index
  (0 when the catalogue was reused), load time;
- ANN recall@100 and @500 against exact brute force over the same vectors,
  unfiltered and with the region filter the ``ann`` source applies;
- p50/p99 per source (each alone, one request at a time) and of the merged
  ``generate()`` (every source concurrently under its timeouts), with one and
  with four requests in flight, plus the sources that missed their budget;
- vector store memory: Milvus RSS with the collection released and loaded,
  and the raw vector size;
- two-tower training time on MovieLens-100K (CPU) and its per-source recall
  (time-ordered 80/20, every ``--stride``-th held-out event, model.evaluate).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import save
from bench.synthetic import (
    CATEGORIES,
    COVISIT_ITEMS,
    REGIONS,
    SyntheticCatalog,
    drop_synthetic_catalog,
    ensure_synthetic_catalog,
    synthetic_settings,
)
from infra.milvus import MilvusItemIndex, SearchFilter, connect
from serving.candidates import CandidateGenerator, RedisSignals
from serving.config import Settings, load_settings
from serving.pipeline.types import UserContext

RECALL_QUERIES = 100
NOW = datetime(2026, 11, 24, tzinfo=UTC)


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


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(samples_ms, 50)), 2),
            "p99_ms": round(float(np.percentile(samples_ms, 99)), 2), "n": len(samples_ms)}


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[set[int]]:
    """Brute-force top-k rows by inner product (blocks of queries: 1M x 64 scores stay ~80 MB)."""
    out: list[set[int]] = []
    for lo in range(0, len(queries), 20):
        scores = queries[lo:lo + 20] @ vectors.T
        if mask is not None:
            scores[:, ~mask] = -np.inf
        out += [set(np.argpartition(-row, k)[:k].tolist()) for row in scores]
    return out


def recall(index: MilvusItemIndex, queries: np.ndarray, truth: list[set[int]], k: int,
           flt: SearchFilter | None = None) -> float:
    found = [{int(i.removeprefix("syn")) for i, _ in index.search(q, k, flt)} for q in queries]
    return round(float(np.mean([len(f & t) / k for f, t in zip(found, truth, strict=True)])), 4)


def measure_memory(settings: Settings, collection: str) -> dict[str, Any]:
    """Milvus RSS with the collection released, then loaded again (other tenants' activity is noise),
    and the seconds that load took."""
    client = connect(settings)
    try:
        client.release_collection(collection)
        time.sleep(2)
        released = milvus_rss_mb()
        started = time.perf_counter()
        client.load_collection(collection, timeout=600)
        load_s = round(time.perf_counter() - started, 1)
        time.sleep(2)
        loaded = milvus_rss_mb()
    finally:
        client.close()
    if released is None or loaded is None:
        return {"load_s": load_s}
    return {"released": round(released), "loaded": round(loaded), "delta": round(loaded - released), "load_s": load_s}


def contexts(catalog: SyntheticCatalog, vectors: np.ndarray, requests: int) -> tuple[list[UserContext], np.ndarray]:
    """Users whose last items lie in the co-visitation range; their query vector sits near their last item."""
    rng = np.random.default_rng(2)
    last = rng.integers(min(COVISIT_ITEMS, catalog.n_items), size=requests)
    queries = vectors[last] + 0.1 * rng.normal(size=(requests, vectors.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    out = []
    for q in range(requests):
        history = [int(last[q]), *rng.integers(min(COVISIT_ITEMS, catalog.n_items), size=19).tolist()]
        affinity: dict[str, float] = {}
        for rank, i in enumerate(history):
            category = CATEGORIES[catalog.fields["category"][i]]
            affinity[category] = affinity.get(category, 0.0) + 0.9**rank
        out.append(UserContext(user_id=str(q), region=REGIONS[q % len(REGIONS)],
                               recent=[(catalog.item_id(i), "watch", 0.0) for i in history[:5]],
                               consumed={catalog.item_id(i) for i in history}, category_affinity=affinity, now=NOW))
    return out, queries


def bench_size(base: Settings, n: int, requests: int) -> dict[str, Any]:
    settings = synthetic_settings(base)
    # Not loaded here: measure_memory loads it (from released) and times that load.
    catalog = ensure_synthetic_catalog(settings, n, seed=1, load=False)
    settings.retrieval.serving_alias = catalog.alias
    out: dict[str, Any] = {"items": n, "dim": catalog.dim, "collection": catalog.collection, "build": catalog.build}
    out["milvus_rss_mb"] = measure_memory(settings, catalog.collection)
    catalog.build["load_s"] = out["milvus_rss_mb"].pop("load_s", None)
    out["raw_vectors_mb"] = round(n * catalog.dim * 4 / 2**20, 1)
    print(f"[{n:,}] build {catalog.build}; Milvus RSS {out['milvus_rss_mb']} MB")

    vectors = catalog.vectors()
    ctxs, queries = contexts(catalog, vectors, requests)
    index = MilvusItemIndex(settings)
    sample = queries[:RECALL_QUERIES]
    region = REGIONS[0]
    region_mask = (catalog.fields["region"] < 0) | (catalog.fields["region"] == 0)
    started = time.perf_counter()
    out["ann_recall"] = {
        "@100": recall(index, sample, exact_top(vectors, sample, 100), 100),
        "@500": recall(index, sample[:50], exact_top(vectors, sample[:50], 500), 500),
        f"@100 region={region}": recall(index, sample, exact_top(vectors, sample, 100, region_mask), 100,
                                        SearchFilter(region=region)),
        "queries": RECALL_QUERIES,
    }
    del vectors
    print(f"[{n:,}] ANN recall vs exact {out['ann_recall']} ({time.perf_counter() - started:.0f} s)")

    generator = CandidateGenerator(settings.retrieval, lambda: _QueryModel(queries), index, RedisSignals(settings))
    quotas = settings.retrieval.quotas
    per_source: dict[str, list[float]] = {name: [] for name in quotas}
    errors = dict.fromkeys(quotas, 0)
    for ctx in ctxs[:10]:
        generator.generate_sync(ctx)  # warm-up: connections, caches
    for ctx in ctxs:
        for source, k in quotas.items():
            # A request of its own per source: ann and item2item share one index call per request,
            # so each of their rows times that call (on one request, the second would read its hits).
            request = generator.prepare(ctx)
            t0 = time.perf_counter()
            try:
                generator.sources[source](request, k)
            except Exception:  # noqa: BLE001 (a timeout under load is a result, counted)
                errors[source] += 1
            per_source[source].append((time.perf_counter() - t0) * 1000)
    out["per_source"] = {source: {**percentiles(samples), "errors": errors[source]}
                         for source, samples in per_source.items()}
    out["merged"] = {f"concurrency_{c}": asyncio.run(_merged(generator, ctxs, c)) for c in (1, 4)}
    out["merged"]["budget_ms"] = settings.retrieval.total_timeout_s * 1000
    for source, f in out["per_source"].items():
        print(f"[{n:,}] {source:16} p50 {f['p50_ms']:7.2f} ms  p99 {f['p99_ms']:7.2f} ms")
    for label, f in out["merged"].items():
        if isinstance(f, dict):
            print(f"[{n:,}] merged {label:9} p50 {f['p50_ms']:7.2f} ms  p99 {f['p99_ms']:7.2f} ms "
                  f"({f['mean_candidates']} candidates, sources skipped {f['skipped']})")
    index.close()
    return out


class _QueryModel:
    """Stands in for the user tower: the bench's query vector for this user (no torch cost here)."""

    def __init__(self, queries: np.ndarray) -> None:  # noqa: D107
        self.queries = queries

    def encode_user(self, ctx: UserContext) -> np.ndarray:
        return self.queries[int(ctx.user_id)]


async def _merged(generator: CandidateGenerator, ctxs: list[UserContext], concurrency: int) -> dict[str, Any]:
    """generate() for every context, ``concurrency`` requests in flight (as the API would run them)."""
    samples, sizes = [], []
    skipped: dict[str, int] = {}
    semaphore = asyncio.Semaphore(concurrency)
    logger = __import__("logging").getLogger("serving.candidates.generator")
    level, logger.level = logger.level, 40  # skipped sources are counted below, not logged per request

    async def one(ctx: UserContext) -> None:
        async with semaphore:
            t0 = time.perf_counter()
            trace: dict[str, Any] = {}
            candidates = await generator.generate(ctx, trace=trace)
            samples.append((time.perf_counter() - t0) * 1000)
            sizes.append(len(candidates))
            for name in trace["failed"]:
                skipped[name] = skipped.get(name, 0) + 1

    try:
        for ctx in ctxs[:10]:
            await generator.generate(ctx)
        await asyncio.gather(*(one(ctx) for ctx in ctxs))
    finally:
        logger.level = level
    return {**percentiles(samples), "mean_candidates": round(float(np.mean(sizes)), 1), "skipped": skipped}


def bench_training(settings: Settings, stride: int) -> dict[str, object]:
    from model.evaluate import evaluate_movielens

    report = evaluate_movielens(settings, stride=stride)
    print(f"training on MovieLens-100K (80%): {report['train_seconds']} s; recall@500 merged "
          f"{report['metrics']['recall@500_merged']}")  # type: ignore[index]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated catalogue sizes")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--stride", type=int, default=20, help="evaluate every n-th held-out MovieLens event")
    parser.add_argument("--drop", action="store_true", help="drop the synthetic catalogues at the end")
    args = parser.parse_args(argv)
    settings = load_settings()
    from infra.milvus import vector_index_params

    result: dict[str, Any] = {"quotas": settings.retrieval.quotas, "shared_index_call": ["ann", "item2item"],
                              "index": vector_index_params(settings),
                              "ef_search": settings.retrieval.ef_search,
                              "load_average_1_5_15_before": [round(x, 2) for x in os.getloadavg()]}
    started = time.perf_counter()
    result["sizes"] = [bench_size(settings, int(n), args.requests) for n in args.sizes.split(",")]
    # Latencies on a shared 2-core machine depend on what else runs: keep the load beside them.
    result["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds_synthetic"] = round(time.perf_counter() - started, 1)
    if not args.skip_train:
        started = time.perf_counter()
        result["training"] = bench_training(settings, args.stride)
        result["stride"] = args.stride
        result["seconds_training"] = round(time.perf_counter() - started, 1)
    if args.drop:
        drop_synthetic_catalog(synthetic_settings(settings))
    save("retrieval", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
