"""GET /recommendations latency and throughput on ONE uvicorn worker: cached and live paths at 10k, 100k, 1M items.

    python -m bench.latency [--sizes 10000,100000,1000000] [--seconds 8] [--rounds 3] [--latency-seconds 20] [--drop]

In: the embedded stack's broker, Redis and Milvus (`make up`). Out:
bench/results/latency.json (plot: bench.plots): requests/s, p50/p90/p99 per
path and catalogue size, a FastAPI hello-world measured in the same run (the
ceiling), ratios to it, and the peak memory of each process.

Synthetic data, isolated from the demo: the shared catalogue of
bench/synthetic.py (items ``syn<n>``, clustered unit vectors of dim =
model.dim in Milvus behind its own alias, their feature documents, trending
and co-visitation under the Redis prefix ``benchsyn:``; built once per
``make bench`` and shared with the retrieval benchmark), plus users
``synu<k>`` (profile, 20 recent items, 3 favourite categories) and a two-tower
and heavy ranker with random weights in the bench's registry (latency does
not depend on what the weights learnt).
Impressions go to ``benchlat.``-prefixed topics.

Each size gets two API processes on the real app (serving.app): the default
configuration for the cached path (lists pre-warmed by one request per user,
then every request is a cache hit), and ``recommend.fallbacks = [live,
popular]`` for the live path (candidates from Milvus + Redis, light rank,
heavy rank, policy re-rank on every request). wrk rotates over the users.
Each path is measured twice: first for ``--latency-seconds`` (20) at
``--latency-connections`` (1) for the latency a request sees on a worker that
is not saturated (where p99 targets are read), then at
``--cached-connections`` / ``--live-connections`` for throughput (requests/s;
latency there is mostly queueing behind one worker). The hello-world gets the
same two runs, with the same wrk script (the same rotating query strings,
which its route ignores), and stays up: the cached path's throughput is
``--rounds`` (3) runs, each right after a hello-world run, and its ratio to
the hello-world is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from bench._common import save, uvicorn_server, wrk
from demo.movielens import REGIONS

PREFIX = "benchlat"
USERS = 200
SEED = 1  # the synthetic catalogue's seed: the one the retrieval benchmark builds too


def item_id(n: int) -> str:
    return f"syn{n}"


def bench_settings(size: int | None = None) -> Any:
    from bench.synthetic import SyntheticCatalog, synthetic_settings
    from serving.config import load_settings

    s = synthetic_settings(load_settings())
    s.kafka.topic_prefix = f"{PREFIX}."
    s.stack.state_dir = Path(s.stack.state_dir) / "bench-latency"
    if size is not None:
        s.retrieval.serving_alias = SyntheticCatalog(n_items=size, seed=SEED, dim=s.model.dim).alias
    return s


# -- synthetic data ------------------------------------------------------------------------------
def write_users(settings: Any) -> None:
    """Users with a profile, 20 recent items among the ones with co-visitation neighbours and 3 favourite
    categories (so the content source searches, as it does for a real user with history)."""
    import redis

    from bench.synthetic import CATEGORIES, COVISIT_ITEMS, item_id

    r = redis.Redis.from_url(settings.redis.url)
    keys, rng, now = settings.keys, random.Random(7), time.time()
    pipe = r.pipeline(transaction=False)
    for u in range(USERS):
        user = f"synu{u}"
        recent = rng.sample(range(COVISIT_ITEMS), 20)
        affinity = dict(zip(rng.sample(CATEGORIES, 3), (3.0, 2.0, 1.0), strict=True))
        pipe.set(keys.user_profile(user), orjson.dumps({
            "user_id": user, "language": "en", "region": REGIONS[u % len(REGIONS)], "age_bucket": "25-34"}))
        pipe.set(keys.user_features(user), orjson.dumps({
            "user_id": user,
            "recent": [{"item_id": item_id(i), "interaction_type": "watch", "ts": now - k * 60}
                       for k, i in enumerate(recent)],
            "consumed": [item_id(i) for i in recent], "skipped": [],
            "category_affinity": affinity, "long_term_affinity": affinity, "total_events": 20}))
    pipe.execute()
    r.close()


def ensure_model(settings: Any) -> None:
    """A two-tower and a heavy ranker, both with random weights, over syn0..syn9999, live in the bench registry.

    The ranker makes the live path do what it does in production (features for the ~200 of the
    light shortlist, one MLP pass); what its weights learnt does not change the latency.
    """
    import numpy as np
    import torch

    from bench.synthetic import item_id
    from model.ranker import META, HeavyRanker, RankerNet
    from model.registry import ModelRegistry, save_model
    from model.two_tower import TowerConfig, TwoTower, TwoTowerModel
    from schemas.models import ModelVersion
    from serving.pipeline.ranking import FEATURE_NAMES

    registry = ModelRegistry(settings)
    live = registry.live()
    if live is not None and (Path(live.artefacts) / META).exists():
        return
    torch.manual_seed(7)
    model = TwoTowerModel(TwoTower(TowerConfig(n_items=10_000, dim=settings.model.dim)),
                          [item_id(n) for n in range(10_000)], version="benchlat_random")
    path = save_model(settings, model)
    n = len(FEATURE_NAMES)
    HeavyRanker(RankerNet(n), np.zeros(n), np.ones(n), {"features": list(FEATURE_NAMES), "hidden": 32}).save(path)
    registry.put(ModelVersion(version=model.version, artefacts=str(path), training_items=10_000))
    registry.set_live(model.version)


def drop_all() -> None:
    import redis

    from bench.synthetic import drop_synthetic_catalog

    s = bench_settings()
    drop_synthetic_catalog(s)
    r = redis.Redis.from_url(s.redis.url)
    users = [k for pattern in (s.keys.user_profile("synu*"), s.keys.user_features("synu*"))
             for k in r.scan_iter(match=pattern, count=10_000)]
    if users:
        r.unlink(*users)
    print(f"dropped the synthetic catalogues and {len(users):,} user keys")


# -- measuring -----------------------------------------------------------------------------------
class Server(NamedTuple):
    """A server under test: where wrk sends requests, and its process (for its CPU)."""

    url: str
    pid: int


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


def hello_paths(paths: list[str]) -> list[str]:
    """The recommendation paths' query strings on the hello-world route (which ignores them).

    The hello-world is driven by the same wrk script as the path it is compared with: rotating
    paths make wrk run Lua per request, which on these 2 cores takes CPU from the server (the
    hello-world answered ~10% fewer requests/s with them than with one fixed path).
    """
    return ["/hello" + p[p.index("?"):] for p in paths]


def interleaved(hello: Server, api: Server, paths: list[str], headers: dict[str, str], seconds: int,
                connections: int, rounds: int) -> dict[str, Any]:
    """Saturated runs of the path, each right after one of the hello-world: the ratio is the median of the rounds'.

    A ratio of two runs minutes apart measured the machine's drift as much as the service; taken
    round by round, the hello-world shares each path run's background. Each round also gives
    the ratio of the two servers' own CPU per request (``cpu_ratio_to_hello_world``): what the
    requests/s ratio would be if each had a core to itself, which on 2 cores shared with wrk,
    Redis, the broker and Milvus neither has.
    """
    runs = []
    for _ in range(rounds):
        h = wrk(hello.url, seconds=seconds, connections=connections, paths=hello_paths(paths), server_pid=hello.pid)
        run = wrk(api.url, seconds=seconds, connections=connections, headers=headers, paths=paths, server_pid=api.pid)
        runs.append({**run, "hello_world_rps": h["rps"], "ratio_to_hello_world": round(run["rps"] / h["rps"], 3),
                     "hello_world_cpu_ms_per_request": h["server_cpu_ms_per_request"],
                     "hello_world_cores": h["server_cores"],
                     "cpu_ratio_to_hello_world": round(h["server_cpu_ms_per_request"]
                                                       / run["server_cpu_ms_per_request"], 3)})
    median = sorted(runs, key=lambda r: r["ratio_to_hello_world"])[len(runs) // 2]
    keep = ("rps", "hello_world_rps", "ratio_to_hello_world", "p50_ms", "p99_ms", "server_cpu_ms_per_request",
            "hello_world_cpu_ms_per_request", "server_cores", "hello_world_cores", "cpu_ratio_to_hello_world")
    return {**median, "rounds": [{k: r[k] for k in keep} for r in runs]}


def user_paths() -> list[str]:
    """One homepage request per synthetic user: wrk rotates over them."""
    return [f"/recommendations?user_id=synu{u}&surface=homepage&limit=10" for u in range(USERS)]


LIVE_ENV = {"RECSYS_RECOMMEND__FALLBACKS": '["live","popular"]'}  # the live path on every request


def prepare_size(size: int) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """Catalogue, users, model and an API key for one size: (its build figures, request headers, API env)."""
    from bench.synthetic import ensure_synthetic_catalog
    from infra.apikeys import create_key
    from infra.kafka import ensure_topics
    from infra.stack import settings_env

    s = bench_settings(size)
    ensure_topics(s)
    catalog = ensure_synthetic_catalog(s, size, seed=SEED)
    write_users(s)
    ensure_model(s)
    key, _ = create_key(s, name=f"bench-latency-{size}", scopes=["recs:read"], rate_per_s=1e6, burst=10**7)
    env = {**settings_env(s), "RECSYS_RETRIEVAL__SERVING_ALIAS": s.retrieval.serving_alias,
           "RECSYS_RETRIEVAL__COLLECTION_PREFIX": s.retrieval.collection_prefix,
           "RECSYS_OBSERVABILITY__LOG_LEVEL": "CRITICAL"}
    return {"collection": catalog.collection, **catalog.build}, {"X-API-Key": key}, env


def warm(base: str, paths: list[str], headers: dict[str, str], cached: bool) -> dict[str, Any]:
    """Connections and model loaded; for the cached path, every user's list in the cache."""
    if not cached:
        asyncio.run(sample_paths(base, paths[:20], headers, concurrency=1))
        return {}
    # A list is cached only when the live path made it (a fallback answer is not):
    # ask, one at a time, until every user's list is in the cache.
    pending, passes = list(paths), 0
    while pending and passes < 6:
        asyncio.run(sample_paths(base, pending, headers, concurrency=1))
        time.sleep(0.3)  # the live path writes the cache in the background
        served = asyncio.run(sample_paths(base, pending, headers, concurrency=1))
        pending, passes = [p for p in pending if served[p] != "cache"], passes + 1
    return {"warmup_passes": passes, "uncached_users": len(pending)}


def measure_size(size: int, hello: Server, args: argparse.Namespace) -> dict[str, Any]:
    from tests.conftest import free_port

    setup, headers, env = prepare_size(size)
    paths = user_paths()
    out: dict[str, Any] = {"items": size, **setup}
    for path_name, extra in (("live", LIVE_ENV), ("cached", {})):
        port = free_port()
        with uvicorn_server("serving.app:create_app", port, env={**env, **extra}) as process:
            base = f"http://127.0.0.1:{port}"
            result = warm(base, paths, headers, cached=path_name == "cached")
            # The unsaturated run goes first: after the saturated one, searches that outlived their
            # budget are still queued in Milvus and the thread pool, and the first seconds of a run
            # after it measured that backlog, not a worker with one request in flight.
            unsaturated = wrk(base, seconds=args.latency_seconds, connections=args.latency_connections,
                              headers=headers, paths=paths, server_pid=process.pid)
            unsaturated["served_from_sample"] = dict(Counter(asyncio.run(
                sample_paths(base, paths[:100], headers, concurrency=args.latency_connections)).values()))
            if path_name == "cached":
                result.update(interleaved(hello, Server(base, process.pid), paths, headers, args.seconds,
                                          args.cached_connections, args.rounds))
            else:
                result.update(wrk(base, seconds=args.seconds, connections=args.live_connections, headers=headers,
                                  paths=paths, server_pid=process.pid))
            result["unsaturated"] = unsaturated
            result["served_from_sample"] = dict(Counter(asyncio.run(sample_paths(base, paths[:100], headers)).values()))
            result["api_peak_rss_mb"] = peak_rss_mb(process.pid)
        out[path_name] = result
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--seconds", type=int, default=8, help="length of each saturated run")
    parser.add_argument("--live-connections", type=int, default=4)
    parser.add_argument("--cached-connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3,
                        help="saturated cached runs per size, each right after a hello-world run (median ratio)")
    parser.add_argument("--latency-connections", type=int, default=1,
                        help="connections of the unsaturated run of each path, run first (where p99 is read)")
    parser.add_argument("--latency-seconds", type=int, default=20,
                        help="length of the unsaturated runs: a live p99 over ~250 requests (8 s) was the 3rd worst")
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
    # The hello-world stays up for the whole run: the cached path's rounds are interleaved with it.
    with uvicorn_server("bench.hello:create_app", port) as process:
        hello = Server(f"http://127.0.0.1:{port}/hello", process.pid)
        rotating = hello_paths(user_paths())
        results["hello_world"] = wrk(hello.url, seconds=args.seconds, connections=args.cached_connections,
                                     paths=rotating, server_pid=hello.pid)
        results["hello_world"]["unsaturated"] = wrk(hello.url, seconds=args.latency_seconds,
                                                    connections=args.latency_connections, paths=rotating,
                                                    server_pid=hello.pid)
        results["sizes"] = {}
        for size in sizes:
            print(f"-- {size:,} items")
            results["sizes"][str(size)] = measure_size(size, hello, args)
        results["hello_world"]["peak_rss_mb"] = peak_rss_mb(hello.pid)
    hello_rps = results["hello_world"]["rps"]
    for row in results["sizes"].values():
        # The cached path's ratio is its interleaved rounds' median; the live path's is to the first run.
        row["live"]["ratio_to_hello_world"] = round(row["live"]["rps"] / hello_rps, 3)
    milvus_pid = find_pid("milvus run standalone")
    import redis

    info = redis.Redis.from_url(settings.redis.url).info("memory")
    results["memory"] = {
        "milvus_peak_rss_mb": peak_rss_mb(milvus_pid) if milvus_pid else None,
        "milvus_note": "the shared Milvus server's peak since it started (all collections, all users)",
        "redis_used_memory_peak_mb": round(info["used_memory_peak"] / 2**20, 1),
        "redis_note": "the shared Redis' peak (every prefix)",
    }
    h = results["hello_world"]
    print(f"{'items':>9} {'path':7} {'req/s':>7} {'x hello':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'non2xx':>6} served_from")
    print(f"{'':>9} {'':7} {'(saturated)':>15} {'':>15} {f'(c={args.latency_connections})':>15}")
    print(f"{'-':>9} {'hello':7} {hello_rps:7.0f} {1:7.2f} {h['p50_ms']:7.2f} {h['p99_ms']:7.2f} "
          f"{h['unsaturated']['p50_ms']:7.2f} {h['unsaturated']['p99_ms']:7.2f} {h['non2xx']:6}")
    for size, row in results["sizes"].items():
        for path in ("cached", "live"):
            r = row[path]
            print(f"{int(size):9,} {path:7} {r['rps']:7.0f} {r['ratio_to_hello_world']:7.2f} {r['p50_ms']:7.2f} "
                  f"{r['p99_ms']:7.2f} {r['unsaturated']['p50_ms']:7.2f} {r['unsaturated']['p99_ms']:7.2f} "
                  f"{r['non2xx']:6} {r['served_from_sample']}")
    results["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    save("latency", {"note": "one uvicorn worker per API process; synthetic items; wrk rotates over "
                             f"{USERS} users; live path = recommend.fallbacks [live, popular] with a heavy ranker; "
                             f"cached req/s and ratio: median of {args.rounds} rounds, each right after a "
                             "hello-world run", **results})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_MININTERVAL", "1")
    sys.exit(main())
