"""GET /recommendations latency and throughput on ONE uvicorn worker: cached and live paths at 10k, 100k, 1M items.

    python -m bench.latency [--sizes 10000,100000,1000000] [--seconds 8] [--drop]

In: the embedded stack's broker, Redis and Milvus (`make up`). Out:
bench/results/latency.json (plot: bench.plots): requests/s, p50/p90/p99 per
path and catalogue size, a FastAPI hello-world measured in the same run (the
ceiling), ratios to it, and the peak memory of each process.

Synthetic data, isolated from the demo: items ``syn<n>`` with random unit
vectors (dim = model.dim) in the Milvus collection ``benchlat_items_<size>``
behind the alias ``benchlat_serving_<size>``; their feature documents,
users (profile + 20 recent items), co-visitation and trending ZSETs under the
Redis prefix ``benchlat:``; a two-tower with random weights in the bench's
registry (latency does not depend on what the weights learnt). Collections
and documents are kept between runs (building the 1M HNSW index takes
minutes) unless ``--drop``. Impressions go to ``benchlat.``-prefixed topics.

Each size gets two API processes on the real app (serving.app): the default
configuration for the cached path (lists pre-warmed by one request per user,
then every request is a cache hit), and ``recommend.fallbacks = [live,
popular]`` for the live path (candidates from Milvus + Redis, light rank,
policy re-rank on every request). wrk rotates over the users.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from bench._common import _DONE_LUA, require_wrk, save, uvicorn_server, wrk
from demo.movielens import REGIONS

PREFIX = "benchlat"
USERS = 200
GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western"]
RATINGS = ["G", "PG", "PG-13", "R"]


def item_id(n: int) -> str:
    return f"syn{n}"


def bench_settings(size: int | None = None) -> Any:
    from serving.config import load_settings

    s = load_settings()
    s.kafka.topic_prefix = f"{PREFIX}."
    s.redis.key_prefix = f"{PREFIX}:"
    s.stack.state_dir = Path(s.stack.state_dir) / "bench-latency"
    s.retrieval.collection_prefix = f"{PREFIX}_items"
    if size is not None:
        s.retrieval.serving_alias = f"{PREFIX}_serving_{size}"
    return s


# -- synthetic data ------------------------------------------------------------------------------
def item_meta(n: int) -> dict[str, Any]:
    rng = random.Random(n)
    genres = rng.sample(GENRES, rng.randint(1, 3))
    return {"category": genres[0], "tags": genres, "language": "en", "regions": None, "status": "active",
            "published_at": float(rng.randint(631152000, 1700000000)), "maturity_rating": rng.choice(RATINGS[:3])}


def write_redis(settings: Any, size: int) -> None:
    """Item documents up to ``size`` (kept across runs), users, co-visitation and trending."""
    import redis

    r = redis.Redis.from_url(settings.redis.url)
    keys = settings.keys
    start = 0
    # Documents are written in id order: find how far an earlier run got.
    for probe in (size, 1_000_000, 100_000, 10_000):
        if probe <= size and r.exists(keys.item_features(item_id(probe - 1))):
            start = probe
            break
    for lo in tqdm(range(start, size, 20_000), desc=f"redis items {size:,}", unit="20k", disable=start >= size):
        pipe = r.pipeline(transaction=False)
        for n in range(lo, min(lo + 20_000, size)):
            doc = {"item_id": item_id(n), **item_meta(n), "views": 0, "clicks": n % 7, "watches": n % 13,
                   "likes": n % 5, "skips": 0, "impressions": 0, "watch_seconds": 0.0, "ctr": 0.05,
                   "trending_score": 0.0, "stats_as_of": 0.0, "updated_at": "2024-01-01T00:00:00+00:00"}
            pipe.set(keys.item_features(item_id(n)), orjson.dumps(doc))
        pipe.execute()
    rng = random.Random(7)
    pipe = r.pipeline(transaction=False)
    now = time.time()
    for u in range(USERS):
        user = f"synu{u}"
        recent = rng.sample(range(2000), 20)
        pipe.set(keys.user_profile(user), orjson.dumps({
            "user_id": user, "language": "en", "region": REGIONS[u % len(REGIONS)], "age_bucket": "25-34"}))
        affinity = Counter(item_meta(i)["category"] for i in recent)
        pipe.set(keys.user_features(user), orjson.dumps({
            "user_id": user,
            "recent": [{"item_id": item_id(i), "interaction_type": "watch", "ts": now - k * 60}
                       for k, i in enumerate(recent)],
            "consumed": [item_id(i) for i in recent], "skipped": [],
            "category_affinity": {c: float(v) for c, v in affinity.items()}, "long_term_affinity": {},
            "total_events": 20}))
    for i in range(2000):
        pipe.delete(keys.item_neighbours(item_id(i)))
        pipe.zadd(keys.item_neighbours(item_id(i)), {item_id(j): float(rng.random()) for j in rng.sample(range(10_000), 50)})
    for region in [None, *REGIONS]:
        pipe.delete(keys.trending(region))
        pipe.zadd(keys.trending(region), {item_id(j): float(rng.random()) for j in rng.sample(range(10_000), 500)})
    pipe.execute()
    r.close()


def ensure_model(settings: Any) -> None:
    """A two-tower with random weights over syn0..syn9999, live in the bench registry."""
    import torch

    from model.registry import ModelRegistry, save_model
    from model.two_tower import TowerConfig, TwoTower, TwoTowerModel
    from schemas.models import ModelVersion

    registry = ModelRegistry(settings)
    live = registry.live()
    if live is not None and Path(live.artefacts).exists():
        return
    torch.manual_seed(7)
    model = TwoTowerModel(TwoTower(TowerConfig(n_items=10_000, dim=settings.model.dim)),
                          [item_id(n) for n in range(10_000)], version="benchlat_random")
    path = save_model(settings, model)
    registry.put(ModelVersion(version=model.version, artefacts=str(path), training_items=10_000))
    registry.set_live(model.version)


def ensure_collection(settings: Any, size: int) -> dict[str, Any]:
    """The size's collection (reused when complete), indexed, loaded and behind its alias."""
    from infra.milvus import PK, VECTOR, connect, create_item_collection, swap_alias

    client = connect(settings)
    client_timeout = 600
    name = f"{PREFIX}_items_{size}"
    t0 = time.perf_counter()
    rows_now = 0
    if client.has_collection(name):
        rows_now = int(client.get_collection_stats(name).get("row_count", 0))
        if rows_now != size:
            client.drop_collection(name)
            rows_now = 0
    built = rows_now != size
    if built:
        create_item_collection(client, name, settings.model.dim, settings)
        rng = np.random.default_rng(size)
        for lo in tqdm(range(0, size, 10_000), desc=f"milvus {size:,}", unit="10k"):
            hi = min(lo + 10_000, size)
            vectors = rng.standard_normal((hi - lo, settings.model.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            rows = []
            for n, vector in zip(range(lo, hi), vectors, strict=True):
                meta = item_meta(n)
                rows.append({PK: item_id(n), VECTOR: vector.tolist(), "category": meta["category"],
                             "language": "en", "regions": [], "status": "active",
                             "published_at": int(meta["published_at"]), "maturity_rating": meta["maturity_rating"],
                             "cold": False})
            client.insert(name, rows, timeout=client_timeout)
        client.flush(name, timeout=client_timeout)
    else:
        create_item_collection(client, name, settings.model.dim, settings)  # loads it
    # Searches are brute force on segments not yet indexed: wait for the HNSW build.
    deadline = time.monotonic() + 900
    with tqdm(total=size, desc=f"hnsw {size:,}", unit="row", disable=not built) as bar:
        while time.monotonic() < deadline:
            info = client.describe_index(name, VECTOR)
            indexed = int(info.get("indexed_rows", 0))
            bar.update(indexed - bar.n)
            # pending_index_rows may stay > 0 while compaction re-indexes: rows indexed is what counts.
            if indexed >= size:
                break
            time.sleep(2)
    swap_alias(client, settings.retrieval.serving_alias, name)
    client.close()
    return {"collection": name, "built_now": built, "setup_seconds": round(time.perf_counter() - t0, 1)}


def drop_all() -> None:
    import redis

    from infra.milvus import connect, drop_collection

    s = bench_settings()
    client = connect(s)
    for alias in client.list_aliases().get("aliases", []):
        if alias.startswith(f"{PREFIX}_serving_"):
            client.drop_alias(alias)
    for name in client.list_collections():
        if name.startswith(f"{PREFIX}_items_"):
            drop_collection(client, name)
    client.close()
    r = redis.Redis.from_url(s.redis.url)
    batch = list(r.scan_iter(match=f"{PREFIX}:*", count=10_000))
    for lo in range(0, len(batch), 5000):
        r.unlink(*batch[lo:lo + 5000])
    print(f"dropped {PREFIX} collections and {len(batch):,} Redis keys")


# -- measuring -----------------------------------------------------------------------------------
def wrk_rotating(base: str, paths: list[str], headers: dict[str, str], seconds: int, connections: int) -> dict[str, Any]:
    """wrk over many paths (round robin per thread), same output as bench._common.wrk."""
    lines = [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    lines.append("local paths = {" + ",".join(json.dumps(p) for p in paths) + "}")
    lines.append("local i = 0\nrequest = function()\n  i = i % #paths + 1\n  return wrk.format(\"GET\", paths[i])\nend")
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "rotate.lua"
        lua.write_text("\n".join(lines) + "\n" + _DONE_LUA)
        out = subprocess.run([require_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                              "-s", str(lua), base], capture_output=True, text=True, check=True).stdout
    raw = json.loads(next(x for x in out.splitlines() if x.startswith("WRKJSON ")).removeprefix("WRKJSON "))
    secs = raw["duration_us"] / 1e6
    return {"requests": raw["requests"], "rps": round(raw["requests"] / secs, 1),
            "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "p999_ms": raw["p999_us"] / 1000, "max_ms": raw["max_us"] / 1000, "non2xx": raw["non2xx"],
            "socket_errors": raw["errors"], "connections": connections, "seconds": seconds}


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of a process in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def find_pid(fragment: str) -> int | None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if fragment in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                return int(cmdline.parent.name)
        except OSError:
            continue
    return None


async def sample_paths(base: str, paths: list[str], headers: dict[str, str], concurrency: int = 4
                       ) -> dict[str, str]:
    """One request per path; returns path -> ``served_from`` (or the HTTP status)."""
    import httpx

    served: dict[str, str] = {}
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client:
        async def one(path: str) -> None:
            async with semaphore:
                response = await client.get(path)
                served[path] = (response.json().get("served_from", "?") if response.status_code == 200
                                else f"http_{response.status_code}")

        await asyncio.gather(*(one(p) for p in paths))
    return served


def measure_size(size: int, seconds: int, live_connections: int, cached_connections: int) -> dict[str, Any]:
    from infra.apikeys import create_key
    from infra.kafka import ensure_topics
    from infra.stack import settings_env
    from tests.conftest import free_port

    s = bench_settings(size)
    ensure_topics(s)
    write_redis(s, size)
    ensure_model(s)
    setup = ensure_collection(s, size)
    key, _ = create_key(s, name=f"bench-latency-{size}", scopes=["recs:read"], rate_per_s=1e6, burst=10**7)
    headers = {"X-API-Key": key}
    paths = [f"/recommendations?user_id=synu{u}&surface=homepage&limit=10" for u in range(USERS)]
    env = {**settings_env(s), "RECSYS_RETRIEVAL__SERVING_ALIAS": s.retrieval.serving_alias,
           "RECSYS_RETRIEVAL__COLLECTION_PREFIX": s.retrieval.collection_prefix,
           "RECSYS_OBSERVABILITY__LOG_LEVEL": "CRITICAL"}
    out: dict[str, Any] = {"items": size, **setup}
    for path_name, extra, connections in (
        ("live", {"RECSYS_RECOMMEND__FALLBACKS": '["live","popular"]'}, live_connections),
        ("cached", {}, cached_connections),
    ):
        port = free_port()
        with uvicorn_server("serving.app:create_app", port, env={**env, **extra}) as process:
            base = f"http://127.0.0.1:{port}"
            if path_name == "cached":
                # A list is cached only when the live path made it (a fallback answer is not):
                # ask, one at a time, until every user's list is in the cache.
                pending, passes = list(paths), 0
                while pending and passes < 6:
                    asyncio.run(sample_paths(base, pending, headers, concurrency=1))
                    time.sleep(0.3)  # the live path writes the cache in the background
                    served = asyncio.run(sample_paths(base, pending, headers, concurrency=1))
                    pending, passes = [p for p in pending if served[p] != "cache"], passes + 1
                result = {"warmup_passes": passes, "uncached_users": len(pending)}
            else:
                asyncio.run(sample_paths(base, paths[:20], headers, concurrency=1))  # connections, model load
                result = {}
            result.update(wrk_rotating(base, paths, headers, seconds, connections))
            result["served_from_sample"] = dict(Counter(asyncio.run(sample_paths(base, paths[:100], headers)).values()))
            result["api_peak_rss_mb"] = peak_rss_mb(process.pid)
        out[path_name] = result
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--live-connections", type=int, default=4)
    parser.add_argument("--cached-connections", type=int, default=32)
    parser.add_argument("--drop", action="store_true", help="remove the synthetic collections and keys, then exit")
    args = parser.parse_args(argv)
    if args.drop:
        drop_all()
        return 0
    sizes = [int(x) for x in args.sizes.split(",") if x]
    from infra.stack import port_open, split_host_port
    from tests.conftest import free_port

    settings = bench_settings()
    if not port_open(*split_host_port(settings.kafka.bootstrap_servers)):
        sys.exit(f"no broker at {settings.kafka.bootstrap_servers}: start the stack with `make up` first")
    results: dict[str, Any] = {}
    port = free_port()
    with uvicorn_server("bench.hello:create_app", port) as hello:
        results["hello_world"] = wrk(f"http://127.0.0.1:{port}/hello", seconds=args.seconds,
                                     connections=args.cached_connections)
        results["hello_world"]["peak_rss_mb"] = peak_rss_mb(hello.pid)
    results["sizes"] = {}
    for size in sizes:
        print(f"-- {size:,} items")
        results["sizes"][str(size)] = measure_size(size, args.seconds, args.live_connections, args.cached_connections)
    hello_rps = results["hello_world"]["rps"]
    for row in results["sizes"].values():
        for path in ("cached", "live"):
            row[path]["ratio_to_hello_world"] = round(row[path]["rps"] / hello_rps, 3)
    milvus_pid = find_pid("milvus run standalone")
    import redis

    info = redis.Redis.from_url(settings.redis.url).info("memory")
    results["memory"] = {
        "milvus_peak_rss_mb": peak_rss_mb(milvus_pid) if milvus_pid else None,
        "milvus_note": "the shared Milvus server's peak since it started (all collections, all users)",
        "redis_used_memory_peak_mb": round(info["used_memory_peak"] / 2**20, 1),
        "redis_note": "the shared Redis' peak (every prefix)",
    }
    print(f"{'items':>9} {'path':7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'x hello':>7} {'non2xx':>6} served_from")
    print(f"{'-':>9} {'hello':7} {hello_rps:7.0f} {results['hello_world']['p50_ms']:7.2f} "
          f"{results['hello_world']['p99_ms']:7.2f} {1:7.2f} {results['hello_world']['non2xx']:6}")
    for size, row in results["sizes"].items():
        for path in ("cached", "live"):
            r = row[path]
            print(f"{int(size):9,} {path:7} {r['rps']:7.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
                  f"{r['ratio_to_hello_world']:7.2f} {r['non2xx']:6} {r['served_from_sample']}")
    results["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    save("latency", {"note": "one uvicorn worker per API process; synthetic items; wrk rotates over "
                             f"{USERS} users; live path = recommend.fallbacks [live, popular]", **results})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_MININTERVAL", "1")
    sys.exit(main())
