"""Feature freshness, flow throughput, Redis memory and reader latency (issue 3).

    python -m bench.freshness [--seconds 20] [--skip-max]

In: a tansu broker of its own (free port), the local Redis (own key prefix,
deleted at the end), MovieLens-100K from the recbole wheel (demo/movielens.py),
flows/features run as ``python -m bytewax.run`` (one process, recovery on).
Out: bench/results/freshness.json and printed figures:

1. throughput: the whole MovieLens-100K log (100,000 ratings) is produced
   first, then the flow replays it; events/s = 100,000 / (last user document
   complete - first document written), so process start-up is left out.
2. freshness at a steady 2,000 events/s: MovieLens events replayed again with
   new ids at a paced rate, one in ten a probe event of a fresh user; lag =
   probe produced -> probe visible, both in the compact document the API reads
   and in Feast's online store (its Redis hash for that user), polled every 2 ms.
3. the same at 80% of the measured maximum rate.
4. Redis memory per user and per item after the replay (MEMORY USAGE of every
   key the features flow writes for it: compact documents + the Feast hash).
5. reader latency: OnlineFeatures.user_context + item_features(200 items),
   the serving hot path, with and without the in-process item cache.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis
from confluent_kafka import Producer

from bench._common import save
from demo.movielens import load_movielens
from infra.kafka import ensure_topics, producer_config
from infra.stack import EmbeddedStack
from schemas.events import InteractionEvent
from schemas.topics import Topics
from serving.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
POLL_WINDOW = 500  # probes checked per polling round (every 2 ms)
# EXISTS of every key given, as a list of 0/1 in the same order, in one round trip.
_EXISTS_ALL = "local found = {} for i, key in ipairs(KEYS) do found[i] = redis.call('EXISTS', key) end return found"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), so throughput can be stated per CPU second."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _flow_env(settings: Settings) -> dict[str, str]:
    env = {**os.environ, "RECSYS_ENVIRONMENT": settings.environment}
    for section in ("kafka", "redis", "features"):
        for name, value in getattr(settings, section).model_dump().items():
            env[f"RECSYS_{section.upper()}__{name.upper()}"] = str(value)
    return env


class Bench:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.state = ROOT / ".recsys" / f"bench-freshness-{uuid.uuid4().hex[:6]}"
        port = _free_port()
        tag = uuid.uuid4().hex[:8]
        base = load_settings()
        self.settings = load_settings(
            environment="test",
            kafka={"bootstrap_servers": f"127.0.0.1:{port}", "topic_prefix": f"fresh{tag}."},
            redis={**base.redis.model_dump(), "key_prefix": f"bench:fresh{tag}:"},
            features={**base.features.model_dump(), "registry_dir": str(self.state / "feast")},
            stack={**base.stack.model_dump(), "state_dir": self.state, "broker_listen": f"127.0.0.1:{port}"},
        )
        self.stack = EmbeddedStack(self.settings)
        self.redis = redis.Redis.from_url(self.settings.redis.url)
        self.flow: subprocess.Popen[bytes] | None = None
        self.producer: Producer | None = None
        self.templates: list[dict[str, Any]] | None = None  # MovieLens events as JSON-ready dicts

    # -- plumbing ------------------------------------------------------------------
    def start(self) -> None:
        self.stack.start(self.stack.broker())
        ensure_topics(self.settings)
        self.producer = Producer(producer_config(self.settings, **{"linger.ms": 1, "message.timeout.ms": 30_000,
                                                                   "queue.buffering.max.messages": 1_000_000}))

    def start_flow(self) -> None:
        recovery = self.state / "recovery"
        log = (self.state / "flow.log").open("ab")
        self.flow = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "bytewax.run", "flows.features:build_flow()", "-r", str(recovery), "-s", "5",
             "-b", "0"], cwd=ROOT, env=_flow_env(self.settings), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def stop(self) -> None:
        if self.flow is not None and self.flow.poll() is None:
            os.killpg(self.flow.pid, signal.SIGTERM)
            self.flow.wait(10)
        self.stack.stop("broker")
        keys = list(self.redis.scan_iter(f"{self.settings.redis.key_prefix}*", count=5000))
        from feature_repo.store import project_name

        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start:start + 1000])
        self._delete_feast_rows(project_name(self.settings))
        shutil.rmtree(self.state, ignore_errors=True)

    def _delete_feast_rows(self, project: str) -> None:
        # Feast's Redis keys end with the project name (bytes); remove this run's.
        suffix = project.encode()
        doomed = [k for k in self.redis.scan_iter(count=10_000) if k.endswith(suffix) and not k.startswith(b"bench:")]
        for start in range(0, len(doomed), 1000):
            self.redis.delete(*doomed[start:start + 1000])

    def produce(self, spec: Any, key: str, value: bytes) -> None:
        assert self.producer is not None
        while True:
            try:
                self.producer.produce(self.settings.topic(spec), key=key.encode(), value=value)
                return
            except BufferError:
                self.producer.poll(0.01)

    def _produce_raw(self, produce: Any, topic: str, key: str, value: bytes) -> None:
        while True:
            try:
                produce(topic, key=key.encode(), value=value)
                return
            except BufferError:
                assert self.producer is not None
                self.producer.poll(0.01)

    def users_done(self, user_ids: list[str]) -> int:
        keys = [self.settings.keys.user_features(u) for u in user_ids]
        total = 0
        for start in range(0, len(keys), 1000):
            for raw in self.redis.mget(keys[start:start + 1000]):
                if raw:
                    total += orjson.loads(raw)["total_events"]
        return total

    def feast_key(self, user_id: str) -> bytes:
        from feast.infra.online_stores.helpers import _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        from feature_repo.store import project_name

        key = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=user_id)])
        return _redis_key(project_name(self.settings), key, entity_key_serialization_version=3)

    # -- 1. throughput ----------------------------------------------------------------
    def throughput(self, ml: Any) -> dict[str, Any]:
        for profile in ml.users:
            self.produce(Topics.CATALOG_USERS, profile.user_id, profile.to_json())
        for record in ml.items:
            self.produce(Topics.CATALOG_ITEMS, record.item_id, record.to_json())
        assert self.producer is not None
        self.producer.flush(30)
        self.start_flow()
        last_item = ml.items[-1].item_id
        self._wait(lambda: self.redis.exists(self.settings.keys.item_features(last_item)), 120)
        time.sleep(6)  # a recovery snapshot of the catalog state
        assert self.flow is not None
        cpu0 = _cpu_seconds(self.flow.pid)
        t0 = time.perf_counter()
        for event in ml.interactions:
            self.produce(Topics.INTERACTIONS, event.user_id, event.to_json())
        self.producer.flush(60)
        produce_s = time.perf_counter() - t0
        users = [u.user_id for u in ml.users]
        n = len(ml.interactions)
        first = None
        while True:
            done = self.users_done(users)
            now = time.perf_counter()
            if first is None and done > 0:
                first = now
            if done >= n:
                break
            assert now - t0 < 600, f"replay did not finish: {done}/{n}"
            time.sleep(0.05)
        elapsed = now - (first or t0)
        rate = n / elapsed
        cpu = _cpu_seconds(self.flow.pid) - cpu0
        load = os.getloadavg()[0]
        print(f"throughput: {n} events in {elapsed:.1f} s -> {rate:,.0f} events/s per process "
              f"(produced in {produce_s:.1f} s); the flow used {cpu:.1f} CPU s -> {n / cpu:,.0f} events "
              f"per CPU second; load average {load:.1f} on {os.cpu_count()} cores")
        return {"events": n, "seconds": round(elapsed, 2), "events_per_s": round(rate), "processes": 1,
                "flow_cpu_seconds": round(cpu, 2), "events_per_cpu_second": round(n / cpu),
                "load_average_1m": round(load, 1)}

    # -- 2/3. freshness ----------------------------------------------------------------
    def freshness(self, ml: Any, rate: float, seconds: float) -> dict[str, Any]:
        """Paced replay at ``rate`` events/s; every 10th event is a probe of a new user."""
        base = ml.interactions
        probes: dict[str, float] = {}
        seen_doc: dict[str, float] = {}
        seen_feast: dict[str, float] = {}
        stop = threading.Event()
        lock = threading.Lock()

        unseen: dict[str, None] = {}  # probes not yet visible in both stores, oldest first

        def poll() -> None:
            client = redis.Redis.from_url(self.settings.redis.url)
            # One command per round whatever the number of pending probes: a pipeline of two
            # EXISTS per probe cost this process ~10 us of Python per command, every 2 ms,
            # on the two cores the flow it measures runs on.
            exists = client.register_script(_EXISTS_ALL)
            while not stop.is_set() or (unseen and time.perf_counter() < deadline):
                with lock:
                    # The oldest unseen probes only: probes become visible roughly in the
                    # order produced, a tick at a time.
                    pending = list(itertools.islice(unseen, POLL_WINDOW))
                if pending:
                    keys = [self.settings.keys.user_features(p) for p in pending] + [feast_keys[p] for p in pending]
                    answers = exists(keys=keys)
                    now = time.perf_counter()
                    done = []
                    for i, p in enumerate(pending):
                        if answers[i] and p not in seen_doc:
                            seen_doc[p] = now
                        if answers[len(pending) + i] and p not in seen_feast:
                            seen_feast[p] = now
                        if p in seen_doc and p in seen_feast:
                            done.append(p)
                    with lock:
                        for p in done:
                            del unseen[p]
                time.sleep(0.002)

        feast_keys: dict[str, bytes] = {}
        deadline = float("inf")
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        total = int(rate * seconds)
        tag = uuid.uuid4().hex[:6]
        # Everything but the event id and the probe's time is encoded before the clock
        # starts: building a pydantic model per event capped the generator at ~7k/s,
        # below the rates this run is meant to reach. The bytes are those of to_json().
        if self.templates is None:
            self.templates = [e.model_dump(mode="json", exclude_none=True) for e in base]
        templates = self.templates
        probe_template = InteractionEvent(user_id="p", item_id="i", interaction_type="view").model_dump(
            mode="json", exclude_none=True)
        probe_users = {i: f"probe-{tag}-{i}" for i in range(0, total, 10)}
        feast_keys.update((user, self.feast_key(user)) for user in probe_users.values())
        topic = self.settings.topic(Topics.INTERACTIONS)
        assert self.producer is not None
        produce = self.producer.produce
        assert self.flow is not None
        cpu0, own0 = _cpu_seconds(self.flow.pid), time.process_time()
        start = time.perf_counter()
        for i in range(total):
            due = start + i / rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.001, due - now))
            user = probe_users.get(i)
            if user is not None:
                value = orjson.dumps({**probe_template, "event_id": f"{tag}-{i}", "user_id": user,
                                      "item_id": random.choice(ml.items).item_id,
                                      "timestamp": datetime.now(UTC).isoformat()})
                self._produce_raw(produce, topic, user, value)
                self.producer.poll(0)
                with lock:
                    probes[user] = time.perf_counter()
                    unseen[user] = None
            else:
                src = templates[i % len(templates)]
                self._produce_raw(produce, topic, src["user_id"], orjson.dumps({**src, "event_id": f"{tag}-{i}"}))
            if i % 100 == 0:
                self.producer.poll(0)
        self.producer.flush(30)
        achieved = total / (time.perf_counter() - start)
        deadline = time.perf_counter() + 30
        stop.set()
        poller.join()
        # The flow's CPU over the run (until every probe was seen): what the rate costs it.
        flow_cpu = _cpu_seconds(self.flow.pid) - cpu0
        bench_cpu = time.process_time() - own0  # the producer and the poller: the measurement's own cost
        lag_doc = [(seen_doc[p] - t) * 1000 for p, t in probes.items() if p in seen_doc]
        lag_feast = [(seen_feast[p] - t) * 1000 for p, t in probes.items() if p in seen_feast]
        # Lag by second of the run (when the probe was produced): a periodic pause (a
        # recovery snapshot, a stretched flush) shows as a comb, a backlog as a ramp.
        by_second: dict[int, list[float]] = {}
        for p, t in probes.items():
            if p in seen_doc:
                by_second.setdefault(int(t - start), []).append((seen_doc[p] - t) * 1000)
        timeline = [{"second": sec, "p50_ms": round(_pct(lags, 0.5)), "max_ms": round(max(lags))}
                    for sec, lags in sorted(by_second.items())]
        result = {
            "target_events_per_s": round(rate), "achieved_events_per_s": round(achieved), "seconds": seconds,
            "load_average_1m": round(os.getloadavg()[0], 1),
            "flow_cpu_seconds": round(flow_cpu, 2), "flow_cpu_per_1000_events_ms": round(1e6 * flow_cpu / total, 1),
            "bench_cpu_seconds": round(bench_cpu, 2),
            "probes": len(probes), "probes_seen": len(lag_doc),
            "serving_doc_ms": {"p50": round(_pct(lag_doc, 0.5), 1), "p99": round(_pct(lag_doc, 0.99), 1),
                               "max": round(max(lag_doc, default=float("nan")), 1)},
            "feast_ms": {"p50": round(_pct(lag_feast, 0.5), 1), "p99": round(_pct(lag_feast, 0.99), 1),
                         "max": round(max(lag_feast, default=float("nan")), 1)},
            "serving_doc_by_second": timeline,
        }
        print(f"freshness at {achieved:,.0f} events/s: serving doc p50 {result['serving_doc_ms']['p50']} ms "
              f"p99 {result['serving_doc_ms']['p99']} ms; Feast p50 {result['feast_ms']['p50']} ms "
              f"p99 {result['feast_ms']['p99']} ms ({len(lag_doc)}/{len(probes)} probes seen); the flow used "
              f"{flow_cpu:.1f} CPU s ({result['flow_cpu_per_1000_events_ms']} ms per 1,000 events), this "
              f"process (producer + poller) {bench_cpu:.1f} CPU s; load average {result['load_average_1m']}")
        print("  max lag by second (ms): " + " ".join(str(row["max_ms"]) for row in timeline))
        return result

    # -- 4. memory ----------------------------------------------------------------------
    def memory(self, ml: Any) -> dict[str, Any]:
        from feast.infra.online_stores.helpers import _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        from feature_repo.store import project_name

        project, keys = project_name(self.settings), self.settings.keys

        def usage(names: list[bytes | str]) -> int:
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.memory_usage(name, samples=0)
            return sum(v or 0 for v in pipe.execute())

        def feast(join: str, value: str) -> bytes:
            return _redis_key(project, EntityKey(join_keys=[join], entity_values=[Value(string_val=value)]),
                              entity_key_serialization_version=3)

        users = [u.user_id for u in ml.users]
        items = [i.item_id for i in ml.items]
        user_compact = usage([k for u in users for k in (keys.user_profile(u), keys.user_features(u))])
        user_feast = usage([feast("user_id", u) for u in users])
        item_compact = usage([keys.item_features(i) for i in items])
        item_feast = usage([feast("item_id", i) for i in items])
        trending = usage([keys.trending(None)] + [keys.trending(r) for r in {u.region for u in ml.users if u.region}])
        result = {
            "users": len(users), "items": len(items),
            "bytes_per_user": round((user_compact + user_feast) / len(users)),
            "bytes_per_user_compact": round(user_compact / len(users)),
            "bytes_per_user_feast": round(user_feast / len(users)),
            "bytes_per_item": round((item_compact + item_feast) / len(items)),
            "bytes_per_item_compact": round(item_compact / len(items)),
            "bytes_per_item_feast": round(item_feast / len(items)),
            "trending_lists_bytes": trending,
        }
        print(f"redis memory: {result['bytes_per_user']:,} B per user (compact {result['bytes_per_user_compact']:,}"
              f" + Feast {result['bytes_per_user_feast']:,}), {result['bytes_per_item']:,} B per item (compact "
              f"{result['bytes_per_item_compact']:,} + Feast {result['bytes_per_item_feast']:,})")
        return result

    # -- 5. reader -------------------------------------------------------------------------
    def reader(self, ml: Any, requests: int = 400) -> dict[str, Any]:
        import redis.asyncio as aioredis

        from serving.features import OnlineFeatures

        async def run(cache_ttl_s: float) -> dict[str, float]:
            client = aioredis.Redis.from_url(self.settings.redis.url)
            settings = self.settings.model_copy(deep=True)
            settings.features.reader_cache_ttl_s = cache_ttl_s
            reader = OnlineFeatures(settings, client)
            rng = random.Random(7)
            times = []
            try:
                for _ in range(requests):
                    user = rng.choice(ml.users).user_id
                    candidates = [i.item_id for i in rng.sample(ml.items, 200)]
                    t = time.perf_counter()
                    ctx = await reader.user_context(user)
                    docs = await reader.item_features(candidates)
                    times.append((time.perf_counter() - t) * 1000)
                    assert ctx.recent and len(docs) == 200
            finally:
                await client.aclose()
            return {"p50_ms": round(_pct(times, 0.5), 2), "p99_ms": round(_pct(times, 0.99), 2)}

        result = {"no_cache": asyncio.run(run(0.0)), "cache_1s": asyncio.run(run(1.0))}
        print(f"reader, user + 200 items: p50 {result['no_cache']['p50_ms']} ms p99 {result['no_cache']['p99_ms']}"
              f" ms uncached; p50 {result['cache_1s']['p50_ms']} ms p99 {result['cache_1s']['p99_ms']} ms "
              f"with the 1 s item cache")
        return result

    def _wait(self, condition: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.flow is not None and self.flow.poll() is not None:
                raise RuntimeError(f"flow exited; see {self.state / 'flow.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError("timed out waiting for the flow")
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each steady-rate run")
    parser.add_argument("--skip-max", action="store_true", help="skip the run at 80%% of the maximum rate")
    args = parser.parse_args(argv)
    ml = load_movielens()
    bench = Bench(args.seconds)
    result: dict[str, Any] = {"targets": {"freshness_p99_ms_at_2000_per_s": 1000, "events_per_s_per_process": 20000}}
    try:
        bench.start()
        result["throughput"] = bench.throughput(ml)
        result["memory"] = bench.memory(ml)
        result["reader"] = bench.reader(ml)
        result["freshness_2000"] = bench.freshness(ml, 2000, args.seconds)
        if not args.skip_max:
            near_max = 0.8 * result["throughput"]["events_per_s"]
            result["freshness_80pct_max"] = bench.freshness(ml, near_max, args.seconds)
        result["settings"] = {"flush_interval_s": bench.settings.features.flush_interval_s,
                              "snapshot_interval_s": 5, "kafka_batch_size": bench.settings.features.kafka_batch_size}
    finally:
        bench.stop()
    save("freshness", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
