"""Embeddings and candidates on the real broker, Redis and Milvus server (no mocks).

Each test gets its own topics and Redis prefix (``settings`` fixture) and its own
Milvus collection prefix and alias, dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient

from infra.kafka import producer_config
from infra.milvus import MilvusItemIndex, SearchFilter, alias_target, connect
from model.data import read_interactions
from model.evaluate import ann_recall_vs_exact
from model.registry import ModelRegistry
from model.two_tower import TwoTowerModel
from model.worker import refresh, retire_old_versions, run
from schemas.catalog import ItemRecord
from schemas.events import DeadLetterRecord
from schemas.topics import Topics
from serving.candidates import CandidateGenerator, MemoryItemIndex, RedisSignals
from serving.config import Settings
from serving.pipeline.types import UserContext

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EVENTS = 2500


@pytest.fixture(scope="module")
def movielens():
    from demo.movielens import load_movielens

    return load_movielens()


@pytest.fixture
def rsettings(settings: Settings, tmp_path: Path):
    """Settings with this test's own collections, alias and state folder; drops them at the end."""
    tag = settings.kafka.topic_prefix.strip(".")
    s = settings.model_copy(deep=True)
    s.retrieval.collection_prefix = f"it_{tag}"
    s.retrieval.serving_alias = f"it_{tag}_serving"
    s.stack.state_dir = tmp_path / "state"
    s.model.epochs = 3
    s.model.replay_idle_polls = 2
    s.model.replay_poll_timeout_s = 0.3
    s.model.reload_interval_s = 0.5
    if hasattr(s, "recommend"):
        # The heavy ranker trains inside each refresh too; a small one keeps these tests quick.
        s.recommend.ranker_requests = 100
        s.recommend.ranker_epochs = 1
    yield s
    client = connect(s)
    if alias_target(client, s.retrieval.serving_alias):
        client.drop_alias(s.retrieval.serving_alias)
    for name in client.list_collections():
        if name.startswith(s.retrieval.collection_prefix + "_"):
            client.drop_collection(name)
    client.close()


def produce(settings: Settings, spec, records, key) -> None:
    producer = Producer(producer_config(settings, **{"linger.ms": 20}))
    topic = settings.topic(spec)
    for record in records:
        producer.produce(topic, key=key(record).encode(), value=record.to_json())
        producer.poll(0)
    assert producer.flush(30) == 0


def load_log(settings: Settings, movielens, events: int = EVENTS) -> None:
    produce(settings, Topics.CATALOG_ITEMS, movielens.items, lambda r: r.item_id)
    produce(settings, Topics.CATALOG_USERS, movielens.users, lambda r: r.user_id)
    produce(settings, Topics.INTERACTIONS, movielens.interactions[:events], lambda r: r.user_id)


def test_refresh_from_the_api_trains_indexes_and_goes_live(rsettings: Settings, movielens, auth_headers) -> None:
    from serving.app import create_app

    load_log(rsettings, movielens)
    with TestClient(create_app(rsettings), headers=auth_headers) as client:
        assert client.get("/models").json() == {"live": None, "versions": []}
        answer = client.post("/models/refresh")
        assert answer.status_code == 202 and answer.json()["status"] == "refresh_started"
        assert run(rsettings, stop_after=1) == 1  # the trainer consumes the command and retrains
        body = client.get("/models").json()
    live = body["live"]
    assert live["command_id"] == answer.json()["command_id"] and live["status"] == "live"
    assert live["training_events"] == EVENTS and live["source"] == "topic" and live["trained_at"]
    assert 0 < live["metrics"]["recall@500_merged"] <= 1 and "recall@500_ann" in live["metrics"]
    assert alias_target(connect(rsettings), rsettings.retrieval.serving_alias) == live["collection"]

    # The live collection answers ANN close to exact search (HNSW recall@100 >= 0.95).
    model = TwoTowerModel.load(Path(live["artefacts"]))
    exact = MemoryItemIndex(movielens.items, model.encode_items(movielens.items),
                            [not model.knows(i.item_id) for i in movielens.items])
    users = {u.user_id: u for u in movielens.users}
    queries = np.stack([model.encode_user(UserContext(user_id=u, region=users[u].region, recent=[
        (e.item_id, "watch", 0.0) for e in movielens.interactions[:EVENTS] if e.user_id == u][::-1]))
        for u in sorted({e.user_id for e in movielens.interactions[:EVENTS]})[:40]])
    assert ann_recall_vs_exact(MilvusItemIndex(rsettings), exact, queries, k=100) >= 0.95


def test_second_version_swaps_the_alias_with_no_failed_search(rsettings: Settings, movielens) -> None:
    load_log(rsettings, movielens, events=2000)
    rsettings.model.eval_holdout = 0  # metrics are covered above; keep this test quick
    first = refresh(rsettings, "first")
    index = MilvusItemIndex(rsettings)
    query = np.ones(rsettings.model.dim, dtype=np.float32) / np.sqrt(rsettings.model.dim)
    failures, searches, stop = [], [0], threading.Event()

    def search_forever() -> None:
        while not stop.is_set():
            try:
                assert len(index.search(query, 10)) == 10
                searches[0] += 1
            except Exception as exc:  # noqa: BLE001 (counted, the test fails on any)
                failures.append(repr(exc))

    searcher = threading.Thread(target=search_forever)
    searcher.start()
    try:
        second = refresh(rsettings, "second")
    finally:
        stop.set()
        searcher.join()
    assert failures == [] and searches[0] > 10
    client = connect(rsettings)
    assert alias_target(client, rsettings.retrieval.serving_alias) == second.collection
    assert client.has_collection(first.collection)  # kept: keep_versions=2
    registry = ModelRegistry(rsettings)
    assert registry.live_version() == second.version and registry.get(first.version).status == "retired"
    rsettings.model.keep_versions = 1
    retire_old_versions(rsettings, registry, client)
    assert not client.has_collection(first.collection) and client.has_collection(second.collection)
    assert [v.version for v in registry.versions()] == [second.version]
    assert not Path(first.artefacts).exists() and Path(second.artefacts).exists()


def test_filtered_ann_respects_category_region_and_freshness(rsettings: Settings, movielens) -> None:
    load_log(rsettings, movielens, events=1000)
    rsettings.model.eval_holdout = 0
    refresh(rsettings)
    extra = [ItemRecord(item_id="fr-only", title="Le Film", category="Drama", regions=["fr"], language="fr")]
    model = TwoTowerModel.load(Path(ModelRegistry(rsettings).live().artefacts))
    from infra.milvus import upsert_items

    upsert_items(connect(rsettings), ModelRegistry(rsettings).live().collection, extra, model.encode_items(extra), [True])
    index = MilvusItemIndex(rsettings)
    query = model.encode_items(extra)[0]
    drama = {i for i, _ in index.search(query, 50, SearchFilter(category="Drama"))}
    categories = {i.item_id: i.category for i in movielens.items} | {"fr-only": "Drama"}
    assert drama and {categories[i] for i in drama} == {"Drama"}
    deadline = time.monotonic() + 2
    while "fr-only" not in {i for i, _ in index.search(query, 5, SearchFilter(region="fr"))}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "fr-only" not in {i for i, _ in index.search(query, 50, SearchFilter(region="us-west"))}
    fresh = index.search(query, 20, SearchFilter(fresh_since=int(time.time()) - 86400))
    # No MovieLens film is recent: the fresh pool is the cold (never interacted) items only.
    assert "fr-only" in {i for i, _ in fresh} and not any(model.knows(i) for i, _ in fresh)


def test_archive_and_topic_feed_the_same_training_log(rsettings: Settings, movielens) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    events = movielens.interactions[:500]
    produce(rsettings, Topics.INTERACTIONS, events, lambda r: r.user_id)
    root = Path(rsettings.stack.state_dir) / rsettings.model.archive_dir / "date=1997-09-20"
    root.mkdir(parents=True)
    rows = [e.model_dump() for e in events]
    pq.write_table(pa.Table.from_pylist(rows), root / "part-0.parquet")
    from_topic = sorted(read_interactions(rsettings, "topic"), key=lambda e: e.event_id)
    from_archive = sorted(read_interactions(rsettings, "archive"), key=lambda e: e.event_id)
    assert len(from_topic) == 500 and from_topic == from_archive


def test_put_item_is_retrievable_within_2s_and_gone_2s_after_delete(rsettings: Settings, movielens,
                                                                       auth_headers) -> None:
    from serving.app import create_app

    load_log(rsettings, movielens, events=1000)
    rsettings.model.eval_holdout = 0
    refresh(rsettings)
    env = {**os.environ, **flow_env(rsettings)}
    flow = subprocess.Popen([sys.executable, "-m", "bytewax.run", "flows.catalog:build_flow()"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    index = MilvusItemIndex(rsettings)
    model = TwoTowerModel.load(Path(ModelRegistry(rsettings).live().artefacts))
    body = {"title": "Quasar Zyxw Nebula Saga", "category": "Sci-Fi", "tags": ["Sci-Fi", "Adventure"],
            "language": "xx", "published_at": "2026-01-01T00:00:00Z"}
    query = model.encode_items([ItemRecord(item_id="query", **body)])[0]  # a query near the new item's content

    def found(item_id: str) -> bool:
        return item_id in {i for i, _ in index.search(query, 10)}

    def wait(condition, limit_s: float) -> float:
        started = time.monotonic()
        while not condition():
            assert time.monotonic() - started < limit_s, f"not within {limit_s}s"
            time.sleep(0.02)
        return time.monotonic() - started

    try:
        with TestClient(create_app(rsettings), headers=auth_headers) as client:
            assert client.put("/items/warmup", json=body).status_code == 200
            wait(lambda: found("warmup"), 60)  # the flow is up and caught up
            item_id = f"new-{uuid.uuid4().hex[:6]}"
            assert client.put(f"/items/{item_id}", json=body).status_code == 200
            appeared = wait(lambda: found(item_id), 2.0)
            assert client.delete(f"/items/{item_id}").status_code == 200
            gone = wait(lambda: not found(item_id), 2.0)
        print(f"put->retrievable {appeared:.2f}s, delete->gone {gone:.2f}s")
    finally:
        os.killpg(flow.pid, 15)
        output = flow.communicate(timeout=20)[0].decode(errors="replace")
    assert "Traceback" not in output, output[-3000:]


def flow_env(settings: Settings) -> dict[str, str]:
    from infra.stack import settings_env

    return {**settings_env(settings),
            "RECSYS_RETRIEVAL__COLLECTION_PREFIX": settings.retrieval.collection_prefix,
            "RECSYS_RETRIEVAL__SERVING_ALIAS": settings.retrieval.serving_alias,
            "RECSYS_MODEL__RELOAD_INTERVAL_S": "0.5"}


def test_candidates_degrade_when_milvus_is_down(rsettings: Settings) -> None:
    """Real Redis signals answer while the vector store is unreachable; the request stays in budget."""
    import redis

    client = redis.Redis.from_url(rsettings.redis.url)
    client.zadd(rsettings.keys.trending(None), {"hit": 5.0, "other": 1.0})
    client.zadd(rsettings.keys.trending("fr"), {"local": 2.0})
    client.zadd(rsettings.keys.item_neighbours("seen"), {"neighbour": 3.0})
    dead = rsettings.model_copy(deep=True)
    dead.milvus.uri = "http://127.0.0.1:1"
    dead.milvus.timeout_s = 0.5

    class ProfileModel:
        def encode_user(self, ctx):
            return np.ones(4, dtype=np.float32) / 2

    generator = CandidateGenerator(dead.retrieval, ProfileModel, MilvusItemIndex(dead), RedisSignals(dead))
    ctx = UserContext(user_id="u", region="fr", recent=[("seen", "click", 0.0)], consumed={"seen"})
    started = time.perf_counter()
    candidates = asyncio.run(generator.generate(ctx))
    elapsed = time.perf_counter() - started
    assert {c.item_id: sorted(c.sources) for c in candidates} == {
        "hit": ["trending"], "other": ["trending"], "local": ["trending_region"], "neighbour": ["covisit"]}
    assert elapsed < dead.retrieval.total_timeout_s + 0.1
    client.delete(*client.keys(rsettings.redis.key_prefix + "*"))


def test_catalog_flow_dead_letters_bad_records_and_keeps_going(settings: Settings) -> None:
    from bytewax.testing import TestingSink, TestingSource, run_main

    from flows._common import FlowIO, Message
    from flows.catalog import build_flow

    topic = settings.topic(Topics.CATALOG_ITEMS)
    good = ItemRecord(item_id="ok-1", title="Fine", category="Drama")
    messages = [Message(topic, b"bad", b"{not json", 0, 1), Message(topic, b"ok-1", good.to_json(), 0, 2),
                Message(topic, b"x", b'{"item_id": "x", "status": "gone"}', 0, 3)]
    indexed, dead = [], []
    run_main(build_flow(settings, FlowIO(TestingSource(messages), TestingSink(dead), {"items": TestingSink(indexed)})))
    assert [r.item_id for r in indexed] == ["ok-1"]
    letters = [DeadLetterRecord.from_json(d.value) for d in dead]
    assert [(d.source, d.offset) for d in letters] == [("catalog", 1), ("catalog", 3)]
    assert "status" in letters[1].reason  # the bad field is named


def small_catalogue(rsettings: Settings, n: int = 2000, dim: int = 16) -> np.ndarray:
    """Items i0..i<n-1> behind the test's serving alias: Drama/Comedy alternating, a third shown
    everywhere and the rest in "us" or "fr", published_at = k, every fifth cold. Returns the vectors."""
    from infra.milvus import create_item_collection, rows_from_columns, swap_alias

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    client = connect(rsettings)
    name = f"{rsettings.retrieval.collection_prefix}_small"
    create_item_collection(client, name, dim, rsettings)
    client.insert(name, rows_from_columns(
        [f"i{k}" for k in range(n)], vectors, category=[("Drama", "Comedy")[k % 2] for k in range(n)],
        language=["en"] * n, regions=[[] if k % 3 == 0 else [("us", "fr")[k % 2]] for k in range(n)],
        status=["active"] * n, published_at=[k for k in range(n)], maturity_rating=[""] * n,
        cold=[k % 5 == 0 for k in range(n)]))
    client.flush(name)
    swap_alias(client, rsettings.retrieval.serving_alias, name)
    client.close()
    return vectors


def test_lean_search_answers_as_the_public_pymilvus_call(rsettings: Settings) -> None:
    """MilvusItemIndex reads replies straight from the protobuf: the same ids, scores and order as
    MilvusClient.search, for one and several query vectors, with and without filters; errors still raise."""
    from infra import milvus

    assert milvus._LEAN_SEARCH, "pymilvus lacks what the lean search reads: the serving path uses the slow call"
    vectors = small_catalogue(rsettings)
    client = connect(rsettings)
    index = MilvusItemIndex(rsettings)
    params = {"metric_type": "IP", "params": {"ef": 200}}
    queries = [v.tolist() for v in vectors[:3]]
    for flt in (SearchFilter(), SearchFilter(region="fr"), SearchFilter(categories=("Drama",), region="us"),
                SearchFilter(fresh_since=1500, region="us")):
        for data in (queries[:1], queries):
            lean = index._search_lean(data, 150, flt.expression(), params, 5.0)
            public = index._search_public(data, 150, flt.expression(), params, 5.0)
            assert len(lean) == len(public) == len(data)
            for (lean_ids, lean_scores, _), (ids, scores, _) in zip(lean, public, strict=True):
                assert len(ids) > 0 and list(lean_ids) == list(ids)
                assert list(lean_scores) == list(scores)
    fields = ["category", "cold", "published_at"]
    lean = index._search_lean(queries, 50, "", params, 5.0, fields)
    public = index._search_public(queries, 50, "", params, 5.0, fields)
    for (ids, _, columns), (public_ids, _, public_columns) in zip(lean, public, strict=True):
        assert list(ids) == list(public_ids) and set(columns) == set(fields)
        assert {name: list(c) for name, c in columns.items()} == public_columns
        assert all(c == ("Drama", "Comedy")[int(i[1:]) % 2] for i, c in zip(ids, columns["category"], strict=True))
    # What the sources receive: filtered, exclusions dropped, cut at k.
    hits = index.search_many([vectors[0], vectors[1]], 20, SearchFilter(region="fr", exclude=frozenset({"i0"})))
    assert [len(h) for h in hits] == [20, 20] and "i0" not in {i for i, _ in hits[0]}
    assert all(int(i[1:]) % 3 == 0 or int(i[1:]) % 2 == 1 for h in hits for i, _ in h)  # shown in fr
    missing = MilvusItemIndex(rsettings, target=f"{rsettings.retrieval.collection_prefix}_absent")
    with pytest.raises(Exception, match="(?i)collection"):
        missing.search(vectors[0], 5)
    client.close()


class SearchCountingIndex(MilvusItemIndex):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.searches = 0

    def search(self, *args, **kwargs):
        self.searches += 1
        return super().search(*args, **kwargs)


def test_search_each_answers_as_a_search_per_filter(rsettings: Settings) -> None:
    """content and fresh share one Milvus call: each filter's answer is the one its own search gives,
    also where the other filter's hits crowd it out of the shared search (it is searched again)."""
    vectors = small_catalogue(rsettings)
    index = SearchCountingIndex(rsettings)
    comedy = SearchFilter(categories=("Comedy",), region="fr")
    fresh, rare = SearchFilter(region="fr", fresh_since=1500), SearchFilter(region="fr", fresh_since=1990)
    for query in vectors[:5]:
        for wants, searches in (([(comedy, 30), (fresh, 20)], 0),  # both fill from the shared search
                                ([(comedy, 10), (rare, 250)], 1)):  # rare crowded out: searched alone
            index.searches = 0
            each = index.search_each(query, wants)
            assert index.searches == searches
            alone = [MilvusItemIndex.search(index, query, k, flt) for flt, k in wants]
            for got, expected, (_, k) in zip(each, alone, wants, strict=True):
                assert len(got) == k and [i for i, _ in got] == [i for i, _ in expected]
                assert np.allclose([s for _, s in got], [s for _, s in expected])
    # Nothing passes either filter: empty answers, not an error.
    nothing = [(SearchFilter(categories=("Horror",), region="fr"), 5),
               (SearchFilter(category="Western", region="fr", fresh_since=10**6), 5)]
    assert index.search_each(vectors[0], nothing) == [[], []]
    # Different regions: a search per filter.
    index.searches = 0
    index.search_each(vectors[0], [(comedy, 5), (SearchFilter(region="us", fresh_since=1500), 5)])
    assert index.searches == 2


def test_unfiltered_fallback_answers_as_the_filtered_search(rsettings: Settings) -> None:
    """search_many's fallback for a reply Milvus cut short: an unfiltered search with the filter applied
    here (regions read from the real reply, none = shown everywhere) gives the filtered search's hits."""
    vectors = small_catalogue(rsettings)
    index = MilvusItemIndex(rsettings)
    for flt in (SearchFilter(region="fr"), SearchFilter(region="us", categories=("Drama",), fresh_since=500)):
        for query in vectors[:3]:
            filtered = index.search(query, 40, flt)
            [fallback] = index.search_unfiltered(query, [(flt, 40)])
            assert len(fallback) == 40 and [i for i, _ in fallback] == [i for i, _ in filtered]
    # Several filters from one search, as search_each's fallback asks.
    wants = [(SearchFilter(region="fr", categories=("Comedy",)), 30), (SearchFilter(region="fr", fresh_since=1500), 20)]
    each = index.search_unfiltered(vectors[0], wants)
    assert [[i for i, _ in found] for found in each] == [[i for i, _ in index.search(vectors[0], k, flt)]
                                                         for flt, k in wants]
