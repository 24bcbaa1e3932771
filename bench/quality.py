"""Prequential ("test, then train") replay of MovieLens-100K through the running system, beside baselines.

    python -m bench.quality [--every 20] [--chunk N --stride K] [--baselines-only] [--retrain-every 0]

In: MovieLens-100K (demo.movielens), the embedded stack's broker, Redis and
Milvus (`make up`). Out: bench/results/quality.json (plot: bench.plots):
HR@10, NDCG@10, catalog coverage, intra-list genre diversity and novelty,
overall and for cold users (< 5 prior events) and cold items (< 5 prior events
of the target item), for the system and for most-popular, item-kNN and EASE.

How the system is exercised (all of it real, isolated under its own topic
prefix, Redis key prefix, Feast project and Milvus collection/alias, removed
at the end):
1. a uvicorn API of its own, the features flow and the co-visitation flow
   (``python -m bytewax.run flows.features:build_flow()`` / ``flows.covisit``)
   on the running broker, flushing every 50 ms (the replay waits on them);
2. users and items through ``PUT /users``/``PUT /items`` and the first 80% of
   ratings (time order) through ``POST /interactions/batch`` (demo.load.publish);
   we wait until the flows have written what the pipeline reads (``LiveSystem.wait_for_flow``:
   user and item documents count every event, co-visitation lists the events
   pair items in have changed; no fixed sleeps);
3. the trainer replays the topics (``model.data``) and trains the two-tower on
   the warm-up, the item tower's vectors go into a new Milvus collection behind
   the bench's serving alias and the version becomes live in the registry
   (what a model refresh does);
4. the remaining 20% are cut into chunks of ``--chunk`` consecutive events.
   For each chunk: every user with an evaluated event in it asks the real
   ``Recommender`` (serving.pipeline.factory.build_recommender: candidates from
   Milvus + Redis co-visitation/trending, light rank, policy re-rank) for a
   homepage top 10 (consumed items excluded by the policy); then the chunk is
   POSTed to the API and we wait for the flows the same way. Lists come
   from the live path (``recommend.fallbacks = [live, popular]``): the cache is
   the same pipeline's output stored earlier, and wall-clock TTLs mean nothing
   when a month of events is replayed in minutes. The configured time budgets
   hold: on a loaded machine some lists come from the popular fallback (the
   result's ``served_from`` counts them); ``--relax-budgets`` lifts them.
The default, ``--every N``, is the issue's protocol ("for each later event
ask first, then ingest") on a sample: chunk = stride = N, so every N-th test
event is asked about right after *all* events before it were ingested, and
the other events are only ingested. ``--chunk``/``--stride`` set the two
apart: with chunk > stride a user's later events in one chunk are judged
against the list made before the chunk (every arm alike), which makes
session-following signals look worse than they are (MovieLens users rate
in bursts of tens of movies). The model is trained once on the warm-up
unless ``--retrain-every`` is set.

Baselines see exactly the same events, chunks and asks: their state (who
consumed what) is updated after each chunk; item-kNN and EASE are refit every
``--refit-every`` ingested events, most-popular counts every chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench import baselines, metrics
from bench._common import save
from demo.movielens import MovieLens, load_movielens
from flows.covisit import CONSUMED_TYPES as COVISIT_CONSUMED_TYPES
from schemas.events import InteractionEvent

K = 10
COLD = 5  # fewer prior events than this makes a user (or the target item) cold
# The interaction types an item document counts (views, clicks, watches, likes, skips, impressions).
ITEM_COUNTED = frozenset({"view", "click", "watch", "like", "skip", "impression"})
# How often the replay looks at Redis while it waits for the flows (they flush every 50 ms here).
POLL_S = 0.01
# ... and while they ingest the warm-up (tens of seconds; each poll parses ~1,000 user documents).
WARMUP_POLL_S = 0.2
# How long after the documents a predicted co-visitation change may still be missing (a missed prediction).
COVISIT_GRACE_S = 2.0


def _item_count(raw: bytes | None) -> int:
    """Events an ItemFeatures document (JSON) counts."""
    import orjson

    doc = orjson.loads(raw) if raw else {}
    return sum(int(doc.get(f, 0)) for f in ("views", "clicks", "watches", "likes", "skips", "impressions"))


# -- the harness ------------------------------------------------------------------------------
@dataclass
class LogState:
    """What has been ingested so far, as the baselines and the metrics see it."""

    users: list[str]
    items: list[str]
    matrix: np.ndarray = field(init=False)  # users x items, 1 = consumed
    user_events: Counter[str] = field(default_factory=Counter)
    item_events: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.user_pos = {u: n for n, u in enumerate(self.users)}
        self.item_pos = {i: n for n, i in enumerate(self.items)}
        self.matrix = np.zeros((len(self.users), len(self.items)), dtype=np.float32)

    def ingest(self, events: Sequence[InteractionEvent]) -> None:
        for e in events:
            self.matrix[self.user_pos[e.user_id], self.item_pos[e.item_id]] = 1.0
            self.user_events[e.user_id] += 1
            self.item_events[e.item_id] += 1

    def consumers(self) -> dict[str, int]:
        counts = self.matrix.sum(axis=0)
        return {item: int(counts[n]) for n, item in enumerate(self.items)}

    @property
    def active_users(self) -> int:
        return sum(1 for n in self.user_events.values() if n > 0)


class Arm:
    """One recommender under test: asked for lists, then told about the chunk."""

    name = "arm"

    async def recommend(self, users: Sequence[str], state: LogState) -> dict[str, list[str]]:
        raise NotImplementedError

    async def ingest(self, events: Sequence[InteractionEvent], state: LogState) -> None:
        """Called after ``state`` has taken the chunk."""


class MatrixBaseline(Arm):
    def __init__(self, name: str, fit: Callable[[np.ndarray], np.ndarray], refit_every: int) -> None:
        self.name = name
        self.fit = fit
        self.refit_every = refit_every
        self.weights: np.ndarray | None = None
        self.since_fit = 0
        self.fits = 0
        self.fit_seconds = 0.0

    def _refit(self, state: LogState) -> None:
        t0 = time.perf_counter()
        self.weights = self.fit(state.matrix)
        self.fit_seconds += time.perf_counter() - t0
        self.fits += 1
        self.since_fit = 0

    async def recommend(self, users: Sequence[str], state: LogState) -> dict[str, list[str]]:
        if self.weights is None:
            self._refit(state)
        assert self.weights is not None
        rows = [state.user_pos[u] for u in users]
        tops = baselines.top_k(state.matrix, rows, self.weights, K)
        return {u: [state.items[i] for i in top] for u, top in zip(users, tops, strict=True)}

    async def ingest(self, events: Sequence[InteractionEvent], state: LogState) -> None:
        self.since_fit += len(events)
        if self.since_fit >= self.refit_every:
            self._refit(state)


@dataclass
class Tally:
    """Per-arm accumulators."""

    hits: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ndcg: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    diversity: list[float] = field(default_factory=list)
    novelty: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    recommended: set[str] = field(default_factory=set)
    seconds: float = 0.0

    def summary(self, catalog_size: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group in ("all", "cold_users", "cold_items"):
            out[group] = {"events": len(self.hits[group]), "hr@10": round(metrics.mean(self.hits[group]), 4),
                          "ndcg@10": round(metrics.mean(self.ndcg[group]), 4)}
        out["coverage"] = round(len(self.recommended) / catalog_size, 4)
        out["diversity"] = round(metrics.mean(self.diversity), 4)
        out["novelty"] = round(metrics.mean(self.novelty), 3)
        out["lists"] = len(self.lengths)
        out["short_lists"] = sum(1 for n in self.lengths if n < K)
        out["seconds_asking"] = round(self.seconds, 1)
        return out


def chunked(test: Sequence[InteractionEvent], size: int) -> list[list[InteractionEvent]]:
    return [list(test[i:i + size]) for i in range(0, len(test), size)]


async def replay(data: MovieLens, arms: Sequence[Arm], warmup_fraction: float, chunk: int, stride: int,
                 warmed: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run every arm over the same chunks of held-out events; returns the summary per arm."""
    events = data.interactions
    cut = int(len(events) * warmup_fraction)
    warmup, test = events[:cut], events[cut:]
    state = LogState([u.user_id for u in data.users], [i.item_id for i in data.items])
    state.ingest(warmup)
    genres = {i.item_id: set(i.tags) for i in data.items}
    tallies = {arm.name: Tally() for arm in arms}
    evaluated = set(range(0, len(test), stride))
    position = 0
    chunks = chunked(test, chunk)
    bar = tqdm(total=len(test), desc="quality replay", unit="ev")
    for events_in_chunk in chunks:
        asked = [(position + n, e) for n, e in enumerate(events_in_chunk) if position + n in evaluated]
        users = list(dict.fromkeys(e.user_id for _, e in asked))
        consumers, n_users = state.consumers(), state.active_users
        for arm in arms:
            tally = tallies[arm.name]
            t0 = time.perf_counter()
            lists = await arm.recommend(users, state) if users else {}
            tally.seconds += time.perf_counter() - t0
            for user in users:
                recs = lists.get(user, [])[:K]
                tally.lengths.append(len(recs))
                tally.recommended.update(recs)
                tally.diversity.append(metrics.intra_list_diversity(recs, genres))
                tally.novelty.append(metrics.novelty(recs, consumers, n_users))
            for _, event in asked:
                recs = lists.get(event.user_id, [])[:K]
                hit, gain = metrics.hit_at_k(recs, event.item_id, K), metrics.ndcg_at_k(recs, event.item_id, K)
                groups = ["all"]
                if state.user_events[event.user_id] < COLD:
                    groups.append("cold_users")
                if state.item_events[event.item_id] < COLD:
                    groups.append("cold_items")
                for group in groups:
                    tally.hits[group].append(hit)
                    tally.ndcg[group].append(gain)
        state.ingest(events_in_chunk)
        for arm in arms:
            await arm.ingest(events_in_chunk, state)
        position += len(events_in_chunk)
        bar.update(len(events_in_chunk))
        bar.set_postfix({name: f"{metrics.mean(t.hits['all']):.3f}" for name, t in tallies.items()})
    bar.close()
    return {
        "warmup_events": len(warmup), "test_events": len(test), "evaluated_events": len(evaluated),
        "chunks": len(chunks), "arms": {name: t.summary(len(data.items)) for name, t in tallies.items()},
    }


# -- the live system arm ---------------------------------------------------------------------------
class LiveSystem(Arm):
    """The real stack, isolated under its own names: API + features flow + Milvus + Recommender."""

    name = "system"

    def __init__(self, base: Any, retrain_every: int = 0, keep: bool = False, relax_budgets: bool = False) -> None:
        run = uuid.uuid4().hex[:6]
        self.run = run
        self.retrain_every = retrain_every
        self.keep = keep
        settings = base.model_copy(deep=True)
        settings.kafka.topic_prefix = f"benchq{run}."
        settings.redis.key_prefix = f"benchq{run}:"
        settings.retrieval.collection_prefix = f"benchq{run}_items"
        settings.retrieval.serving_alias = f"benchq{run}_serving"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-quality-{run}-"))
        settings.stack.state_dir = self.tmp
        settings.features.registry_dir = self.tmp / "feast"
        # The replay waits for the flows after every chunk; a short flush keeps that wait short.
        settings.features.flush_interval_s = 0.05
        settings.recommend.fallbacks = ["live", "popular"]
        if relax_budgets:
            # Judge what the pipeline recommends, not whether a loaded machine meets the time budget.
            settings.recommend.total_budget_ms = settings.recommend.candidates_budget_ms = 5000.0
            settings.recommend.features_budget_ms = 2000.0
            settings.retrieval.source_timeout_s = settings.retrieval.total_timeout_s = 4.0
        self.settings = settings
        self.processes: list[subprocess.Popen[bytes]] = []
        self.expected: Counter[str] = Counter()  # events per user the features flow has to count
        self.item_expected: Counter[str] = Counter()  # ... and per item
        self.consumed: set[tuple[str, str]] = set()  # (user, item) first consumptions, as flows/covisit sees them
        self.recent_consumptions: defaultdict[str, list[float]] = defaultdict(list)  # user -> sorted times
        self.served_from: Counter[str] = Counter()
        self.since_train = 0
        self.flow_waits: list[float] = []  # seconds from each chunk's POST answered to the flows' writes seen
        self.info: dict[str, Any] = {"run": run, "topic_prefix": settings.kafka.topic_prefix,
                                     "redis_prefix": settings.redis.key_prefix}
        self.recommender: Any = None
        self._close: Any = None
        self.collections: list[str] = []

    # lifecycle
    async def start(self, data: MovieLens, warmup: Sequence[InteractionEvent]) -> None:
        from bench._common import uvicorn_server
        from demo.load import publish
        from infra.apikeys import create_key
        from infra.kafka import ensure_topics
        from infra.stack import settings_env
        from tests.conftest import free_port

        s = self.settings
        timings = self.info.setdefault("phases_s", {})  # where the run's minutes go
        t0 = time.perf_counter()
        ensure_topics(s)
        env = {**settings_env(s), "RECSYS_FEATURES__REGISTRY_DIR": str(s.features.registry_dir),
               "RECSYS_OBSERVABILITY__LOG_LEVEL": "WARNING"}
        port = free_port()
        self._api = uvicorn_server("serving.app:create_app", port, env=env)
        self._api.__enter__()
        self.api = f"http://127.0.0.1:{port}"
        self.key, _ = create_key(s, name=f"bench-quality-{self.run}", scopes=["events:write", "catalog:write"],
                                 rate_per_s=1e6, burst=10**7)
        for flow in ("features", "covisit"):
            log = (self.tmp / f"{flow}-flow.log").open("ab")
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "bytewax.run", f"flows.{flow}:build_flow()"],
                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        import httpx
        import redis.asyncio as aioredis

        self.redis = aioredis.Redis.from_url(s.redis.url)
        self.http = httpx.AsyncClient(base_url=self.api, headers={"x-api-key": self.key}, timeout=30)
        timings["api_and_flows_start"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        await publish(MovieLens(data.users, data.items, list(warmup)), self.api, self.key, quiet=False)
        timings["warmup_publish"] = round(time.perf_counter() - t0, 1)
        # Every list starts empty under this run's prefix: a predicted pair makes it non-empty.
        changed = self.expect(warmup)
        # Polled every 0.2 s, not every POLL_S: each poll reads and parses every user's document
        # until the flows are through, and at 10 ms that took a core from the flows.
        await self.wait_for_flow(list(self.expected), list(self.item_expected), dict.fromkeys(changed, []),
                                 timeout_s=600, poll_s=WARMUP_POLL_S)
        self.info["warmup_ingest_seconds"] = round(time.perf_counter() - t0, 1)
        timings["warmup_flows"] = round(self.info["warmup_ingest_seconds"] - timings["warmup_publish"], 1)
        # Trained after the warm-up is ingested, not beside it: tried beside it, on 2 cores the
        # training took 80 s instead of ~30 and the two together longer than one after the other.
        t0 = time.perf_counter()
        await asyncio.to_thread(self.train_and_deploy)
        timings["training"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        from serving.pipeline.factory import build_recommender

        self.recommender, self._close = await build_recommender(s)
        timings["recommender"] = round(time.perf_counter() - t0, 1)

    def expect(self, events: Sequence[InteractionEvent]) -> list[str]:
        """Note what the flows will write for these events; returns the items whose co-visitation list must change.

        Features: every user's and item's document counts all of their events. Co-visitation
        (flows/covisit.py): a user's first consumption of an item that has another of the user's
        last ``4 x covisit_max_recent`` first consumptions within ``covisit_window_s`` pairs the
        two, and raises users(item) for that item's list, so every score in it changes.
        """
        cfg = self.settings.features
        window, keep = cfg.covisit_window_s, 4 * cfg.covisit_max_recent
        changed: list[str] = []
        for e in events:
            self.expected[e.user_id] += 1
            if str(e.interaction_type) in ITEM_COUNTED:
                self.item_expected[e.item_id] += 1
            if str(e.interaction_type) not in COVISIT_CONSUMED_TYPES or (e.user_id, e.item_id) in self.consumed:
                continue
            self.consumed.add((e.user_id, e.item_id))
            ts, recent = e.timestamp.timestamp(), self.recent_consumptions[e.user_id]
            if bisect.bisect_right(recent, ts + window) > bisect.bisect_left(recent, ts - window):
                changed.append(e.item_id)
            bisect.insort(recent, ts)
            del recent[: max(0, len(recent) - keep)]
        return list(dict.fromkeys(changed))

    async def neighbour_lists(self, items: Sequence[str]) -> dict[str, list[Any]]:
        """The items' co-visitation lists as they are now (member, score pairs)."""
        pipe = self.redis.pipeline(transaction=False)
        for item in items:
            pipe.zrange(self.settings.keys.item_neighbours(item), 0, -1, withscores=True)
        return dict(zip(items, await pipe.execute(), strict=True))

    async def wait_for_flow(self, users: Sequence[str], items: Sequence[str], covisit: dict[str, list[Any]],
                            timeout_s: float = 120.0, poll_s: float = POLL_S) -> None:
        """Until the flows wrote what the pipeline reads about the events just ingested (see ``expect``).

        The user and item documents count every event (an item's trending scores are written
        in the same Redis pipeline as its document), and the co-visitation list of every item
        in ``covisit`` differs from the one given (read before the events were sent). A pair
        also updates the partner's list, in the same flush (both keys are dirtied in one
        activation) and so in the same MULTI. Nothing here waits a fixed time: a list that
        has not changed ``COVISIT_GRACE_S`` after the documents are complete is counted in
        ``covisit_wait_capped`` (the prediction missed) and the replay goes on.
        """
        import orjson

        keys = self.settings.keys
        users, items = list(users), list(items)
        covisit = dict(covisit)
        deadline = time.monotonic() + timeout_s
        documents_done: float | None = None
        while True:
            if users:
                raws = await self.redis.mget([keys.user_features(u) for u in users])
                users = [u for u, raw in zip(users, raws, strict=True)
                         if (orjson.loads(raw).get("total_events", 0) if raw else 0) < self.expected[u]]
            if items and not users:
                raws = await self.redis.mget([keys.item_features(i) for i in items])
                items = [i for i, raw in zip(items, raws, strict=True) if _item_count(raw) < self.item_expected[i]]
            if covisit:
                now = await self.neighbour_lists(list(covisit))
                covisit = {i: before for i, before in covisit.items() if now[i] == before}
            if not users and not items:
                if not covisit:
                    return
                documents_done = documents_done or time.monotonic()
                if time.monotonic() - documents_done > COVISIT_GRACE_S:
                    self.info["covisit_wait_capped"] = self.info.get("covisit_wait_capped", 0) + 1
                    return
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"a flow exited; see the *-flow.log files in {self.tmp}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"flows still behind after {timeout_s:.0f}s: {len(users)} user documents, "
                                   f"{len(items)} item documents, {len(covisit)} co-visitation lists")
            await asyncio.sleep(poll_s)

    def train_and_deploy(self) -> None:
        """What a model refresh does: replay the log, train, vectors into a new collection, swap, go live."""
        from infra.milvus import (
            collection_name,
            connect,
            create_item_collection,
            swap_alias,
            upsert_items,
        )
        from model.data import read_catalog, read_interactions, read_users
        from model.registry import ModelRegistry, new_version, save_model
        from model.train import train_two_tower
        from schemas.models import ModelVersion

        s = self.settings
        t0 = time.perf_counter()
        # Each topic read ends after a streak of empty polls (~2 s): the three wait at once.
        with ThreadPoolExecutor(3) as pool:
            reads = pool.submit(read_interactions, s, "topic"), pool.submit(read_catalog, s), pool.submit(read_users, s)
            events, items, users = (f.result() for f in reads)
        read_s = time.perf_counter() - t0
        version = new_version()
        model = train_two_tower(events, items, users, s.model, version=version)
        train_s = time.perf_counter() - t0 - read_s
        path = save_model(s, model)
        client = connect(s)
        name = collection_name(s, version)
        self.collections.append(name)
        create_item_collection(client, name, model.dim, s)
        upsert_items(client, name, items, model.encode_items(items), [not model.knows(i.item_id) for i in items])
        client.flush(name)
        swap_alias(client, s.retrieval.serving_alias, name)
        client.close()
        registry = ModelRegistry(s)
        registry.put(ModelVersion(version=version, artefacts=str(path), collection=name,
                                  training_events=len(events), training_items=len(model.item_ids),
                                  training_seconds=float(model.meta.get("training_seconds", 0.0))))
        registry.set_live(version)
        seconds = time.perf_counter() - t0
        self.info.setdefault("trainings", []).append(
            {"version": version, "events": len(events), "items": len(items), "users": len(users),
             "seconds": round(seconds, 1), "read_s": round(read_s, 1), "train_s": round(train_s, 1),
             "deploy_s": round(seconds - read_s - train_s, 1), "final_loss": model.meta.get("final_loss")})
        if self.recommender is not None:
            self.recommender.candidates.model.refresh()

    async def stop(self) -> None:
        if self._close is not None:
            await self._close()
        if getattr(self, "http", None) is not None:
            await self.http.aclose()
        if getattr(self, "redis", None) is not None:
            await self.redis.aclose()
        for process in self.processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if getattr(self, "_api", None) is not None:
            self._api.__exit__(None, None, None)
        if not self.keep:
            await asyncio.to_thread(self.cleanup)

    def cleanup(self) -> None:
        """Drop everything this run created: collections, alias, Redis keys, Feast rows, topics, files."""
        import redis
        from confluent_kafka.admin import AdminClient

        from feature_repo.store import project_name
        from infra.milvus import connect, drop_collection
        from schemas.topics import ALL_TOPICS

        s = self.settings
        try:
            client = connect(s)
            try:
                client.drop_alias(s.retrieval.serving_alias)
            except Exception:  # noqa: BLE001 (absent alias)
                pass
            for name in self.collections:
                drop_collection(client, name)
            client.close()
        except Exception as exc:  # noqa: BLE001 (cleanup is best-effort; say so)
            print(f"warning: Milvus cleanup failed: {exc!r}", file=sys.stderr)
        r = redis.Redis.from_url(s.redis.url)
        # Each SCAN pass walks every key in Redis (1M+ with the synthetic catalogues' documents):
        # one pass when the Feast project's pattern also matches the key prefix (it is derived from it).
        project = project_name(s)
        patterns = [f"*{project}*"] if s.redis.key_prefix.startswith(project) else [f"{s.redis.key_prefix}*",
                                                                                   f"*{project}*"]
        for pattern in patterns:
            batch = list(r.scan_iter(match=pattern, count=10_000))
            for start in range(0, len(batch), 1000):
                r.unlink(*batch[start:start + 1000])
        r.close()
        try:
            admin = AdminClient({"bootstrap.servers": s.kafka.bootstrap_servers})
            for future in admin.delete_topics([s.topic(t) for t in ALL_TOPICS]).values():
                future.result(timeout=10)
        except Exception:  # noqa: BLE001 (tansu may not delete; the topics are small and prefixed)
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    # the arm
    async def recommend(self, users: Sequence[str], state: LogState) -> dict[str, list[str]]:
        from schemas.api import RecommendationRequest

        out: dict[str, list[str]] = {}
        for user in users:
            request = RecommendationRequest(user_id=user, surface="homepage", limit=K)
            response = await self.recommender.recommend(request, request_id=uuid.uuid4().hex)
            self.served_from[response.served_from] += 1
            out[user] = [r.item_id for r in response.recommendations]
        return out

    async def ingest(self, events: Sequence[InteractionEvent], state: LogState) -> None:
        changed = self.expect(events)
        before = await self.neighbour_lists(changed)  # settled: the previous chunk's wait saw its lists change
        body = b'{"events":[' + b",".join(e.to_json() for e in events) + b"]}"
        response = await self.http.post("/interactions/batch", content=body,
                                        headers={"content-type": "application/json"})
        response.raise_for_status()
        t0 = time.perf_counter()
        await self.wait_for_flow(list(dict.fromkeys(e.user_id for e in events)),
                                 list(dict.fromkeys(e.item_id for e in events
                                                    if str(e.interaction_type) in ITEM_COUNTED)), before)
        self.flow_waits.append(time.perf_counter() - t0)
        self.since_train += len(events)
        if self.retrain_every and self.since_train >= self.retrain_every:
            await asyncio.to_thread(self.train_and_deploy)
            self.since_train = 0


# -- entry point -----------------------------------------------------------------------------
async def run(chunk: int, stride: int, warmup_fraction: float, refit_every: int, with_system: bool,
              retrain_every: int, keep: bool, relax_budgets: bool = False) -> dict[str, Any]:
    from serving.config import load_settings

    data = load_movielens()
    arms: list[Arm] = [
        MatrixBaseline("most-popular", baselines.most_popular_weights, refit_every=1),
        MatrixBaseline("item-kNN", baselines.item_knn_weights, refit_every=refit_every),
        MatrixBaseline("EASE", baselines.ease_weights, refit_every=refit_every),
    ]
    system: LiveSystem | None = None
    notes: dict[str, Any] = {}
    if with_system:
        system = LiveSystem(load_settings(), retrain_every=retrain_every, keep=keep, relax_budgets=relax_budgets)
        cut = int(len(data.interactions) * warmup_fraction)
        try:
            await system.start(data, data.interactions[:cut])
            arms.insert(0, system)
        except Exception as exc:  # noqa: BLE001 (report it; the baselines still run)
            notes["system_error"] = f"{type(exc).__name__}: {exc}"
            print(f"error: the live system could not be set up: {exc!r}; running baselines only", file=sys.stderr)
            await system.stop()
            system = None
    t0 = time.perf_counter()
    try:
        result = await replay(data, arms, warmup_fraction, chunk, stride)
    finally:
        replay_s = time.perf_counter() - t0
        if system is not None:
            await system.stop()
            system.info.setdefault("phases_s", {}).update(replay=round(replay_s, 1),
                                                         cleanup=round(time.perf_counter() - t0 - replay_s, 1))
    if system is not None:
        waits = np.array(system.flow_waits or [0.0])
        result["system"] = {**system.info, "served_from": dict(system.served_from),
                            "covisit_wait_capped": system.info.get("covisit_wait_capped", 0),
                            "flow_wait_s": {"mean": round(float(waits.mean()), 3), "p50": round(float(np.median(waits)), 3),
                                            "p99": round(float(np.quantile(waits, 0.99)), 3),
                                            "total": round(float(waits.sum()), 1)}}
    return {
        "protocol": (f"prequential replay of MovieLens-100K in time order: first {warmup_fraction:.0%} warm-up, "
                     + (f"then every {stride}th test event asked right after all earlier events were ingested "
                        "(ask, then ingest)" if chunk == stride else
                        f"then chunks of {chunk} events (ask every user of the chunk, then ingest it); "
                        f"every {stride} test event(s) evaluated")
                     + f"; top-{K}, consumed items excluded"),
        "cold_threshold": COLD, "chunk": chunk, "stride": stride, "refit_every": refit_every,
        "retrain_every": retrain_every, "relaxed_budgets": relax_budgets, **notes, **result,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'arm':14} {'HR@10':>6} {'NDCG@10':>8} {'cold-u HR':>9} {'cold-u NDCG':>11} {'cold-i HR':>9} "
          f"{'cov':>6} {'ILD':>6} {'nov':>6}")
    for name, r in result["arms"].items():
        print(f"{name:14} {r['all']['hr@10']:6.3f} {r['all']['ndcg@10']:8.4f} {r['cold_users']['hr@10']:9.3f} "
              f"{r['cold_users']['ndcg@10']:11.4f} {r['cold_items']['hr@10']:9.3f} {r['coverage']:6.3f} "
              f"{r['diversity']:6.3f} {r['novelty']:6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=20,
                        help="ask before every N-th test event, all earlier events ingested (chunk = stride = N)")
    parser.add_argument("--chunk", type=int, help="test events per ask-then-ingest step (overrides --every)")
    parser.add_argument("--stride", type=int, help="evaluate every k-th test event (overrides --every)")
    parser.add_argument("--warmup", type=float, default=0.8)
    parser.add_argument("--refit-every", type=int, default=2000, help="item-kNN/EASE refit interval (events)")
    parser.add_argument("--retrain-every", type=int, default=0, help="retrain the two-tower every N events (0: never)")
    parser.add_argument("--baselines-only", action="store_true", help="skip the live system (no stack needed)")
    parser.add_argument("--keep", action="store_true", help="leave the run's topics, keys and collections")
    parser.add_argument("--out", default="quality", help="result name: bench/results/<out>.json")
    parser.add_argument("--relax-budgets", action="store_true",
                        help="raise the serving time budgets so a loaded machine does not push lists to fallbacks")
    args = parser.parse_args(argv)
    args.chunk = args.chunk or args.every
    args.stride = args.stride or args.every
    if args.chunk < 1 or args.stride < 1 or not 0 < args.warmup < 1:
        parser.error("--chunk and --stride must be >= 1 and --warmup in (0, 1)")
    result = asyncio.run(run(args.chunk, args.stride, args.warmup, args.refit_every, not args.baselines_only,
                             args.retrain_every, args.keep, args.relax_budgets))
    print_table(result)
    result["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    save(args.out, result)
    if "system" in result["arms"] and "most-popular" in result["arms"]:
        ratio = result["arms"]["system"]["all"]["ndcg@10"] / max(result["arms"]["most-popular"]["all"]["ndcg@10"], 1e-9)
        print(f"system NDCG@10 / most-popular NDCG@10 = {ratio:.2f} (target >= 2)")
    return 0 if not math.isnan(result["arms"].get("EASE", {}).get("all", {}).get("hr@10", 0.0)) else 1


if __name__ == "__main__":
    sys.exit(main())
