"""flows/features on the real broker, Redis and Feast: values, affinity, dead letters, kill -9.

The flow runs to the end of the log (``tail=False``) with a recovery store, in
phases: catalog first, then interactions, as in production where an item is
published before anyone can interact with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest
import redis
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main
from confluent_kafka import Producer
from fastapi.testclient import TestClient

from feature_repo.store import feature_store
from flows._common import ReadLag, kafka_source
from flows.features import build_flow
from infra.kafka import producer_config
from schemas.catalog import ItemRecord, UserProfile
from schemas.events import InteractionEvent
from schemas.topics import Topics
from serving.config import Settings
from serving.features import OnlineFeatures
from tests.integration.test_ingestion import read_topic

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def produce(settings: Settings, spec, records: Iterable[tuple[str, bytes]]) -> None:
    producer = Producer(producer_config(settings, **{"message.timeout.ms": 10_000}))
    for key, value in records:
        producer.produce(settings.topic(spec), key=key.encode(), value=value)
        producer.poll(0)
    assert producer.flush(10) == 0


def like(user: str, item: str, minute: int, kind: str = "like", **extra: object) -> tuple[str, bytes]:
    event = InteractionEvent(event_id=extra.pop("event_id", f"{user}-{item}-{kind}-{minute}"), user_id=user,
                             item_id=item, interaction_type=kind, timestamp=f"2024-05-01T12:{minute:02d}:00Z", **extra)
    return user, event.to_json()


def item(item_id: str, category: str, **extra: object) -> tuple[str, bytes]:
    extra.setdefault("updated_at", "2024-04-01T00:00:00Z")  # the same record whenever a test publishes it
    return item_id, ItemRecord(item_id=item_id, category=category, **extra).to_json()


class FlowRunner:
    """Runs flows/features in this process until the end of the log, keeping state between runs."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.recovery = tmp_path / "recovery"
        self.recovery.mkdir()
        init_db_dir(self.recovery, 1)

    def run(self) -> None:
        run_main(build_flow(self.settings, tail=False), recovery_config=RecoveryConfig(str(self.recovery)))


@pytest.fixture
def flow(settings: Settings, tmp_path: Path) -> FlowRunner:
    return FlowRunner(settings, tmp_path)


def online(settings: Settings, refs: list[str], **entity: str) -> dict[str, object]:
    store = feature_store(settings)
    values = store.get_online_features(features=refs, entity_rows=[entity]).to_dict()
    return {name: column[0] for name, column in values.items()}


def test_produced_events_appear_in_get_online_features(settings: Settings, flow: FlowRunner) -> None:
    produce(settings, Topics.CATALOG_USERS, [("u1", UserProfile(user_id="u1", region="us-west", language="en").to_json())])
    produce(settings, Topics.CATALOG_ITEMS, [item("m1", "Drama", regions=["us-west"]), item("m2", "Comedy")])
    flow.run()
    produce(settings, Topics.INTERACTIONS, [
        like("u1", "m1", 0, "view"), like("u1", "m1", 1, "click"), like("u1", "m1", 2, "like"),
        like("u1", "m2", 3, "watch", interaction_value=120.0), like("u2", "m1", 4, "skip"),
    ])
    flow.run()

    item_values = online(settings, ["item_stats:views", "item_stats:clicks", "item_stats:likes",
                                    "item_stats:skips", "item_stats:ctr", "item_metadata:category",
                                    "item_metadata:regions"], item_id="m1")
    assert item_values["views"] == 1 and item_values["clicks"] == 1
    assert item_values["likes"] == 1 and item_values["skips"] == 1
    assert item_values["category"] == "Drama" and item_values["regions"] == ["us-west"]
    # CTR with the Beta(1, 19) prior: (1 click + 1) / (0 impressions + 20).
    assert item_values["ctr"] == pytest.approx(0.1)
    user_values = online(settings, ["user_short_term:recent_items", "user_short_term:recent_types",
                                    "user_long_term:total_events", "user_long_term:total_watch_seconds",
                                    "user_profile:region"], user_id="u1")
    assert user_values["recent_items"] == ["m2", "m1", "m1", "m1"]
    assert user_values["recent_types"] == ["watch", "like", "click", "view"]
    assert user_values["total_events"] == 4 and user_values["total_watch_seconds"] == 120.0
    assert user_values["region"] == "us-west"


def test_three_likes_in_one_category_put_it_on_top(settings: Settings, flow: FlowRunner) -> None:
    produce(settings, Topics.CATALOG_ITEMS, [item("d1", "Drama"), item("d2", "Drama"), item("d3", "Drama"),
                                             item("c1", "Comedy"), item("c2", "Comedy"), item("a1", "Action")])
    flow.run()
    # Comedy gets more events than Drama (views and clicks), Drama gets the three likes.
    produce(settings, Topics.INTERACTIONS, [
        like("u7", "c1", 0, "view"), like("u7", "c2", 1, "view"), like("u7", "c1", 2, "click"),
        like("u7", "d1", 3), like("u7", "d2", 4), like("u7", "d3", 5), like("u7", "a1", 6, "view"),
    ])
    flow.run()

    values = online(settings, ["user_short_term:affinity_categories"], user_id="u7")
    assert values["affinity_categories"][0] == "Drama"

    import asyncio

    import redis.asyncio as aioredis

    async def context():  # what the recommender reads per request
        client = aioredis.Redis.from_url(settings.redis.url)
        try:
            return await OnlineFeatures(settings, client).user_context("u7")
        finally:
            await client.aclose()

    ctx = asyncio.run(context())
    assert max(ctx.category_affinity, key=ctx.category_affinity.get) == "Drama"
    assert ctx.recent_item_ids[:3] == ["a1", "d3", "d2"]
    assert ctx.consumed == {"c1", "c2", "d1", "d2", "d3", "a1"}


def test_duplicate_event_ids_count_once(settings: Settings, flow: FlowRunner) -> None:
    produce(settings, Topics.CATALOG_ITEMS, [item("m1", "Drama")])
    flow.run()
    event = like("u1", "m1", 0, event_id="same-id")
    produce(settings, Topics.INTERACTIONS, [event, event, event])
    flow.run()
    produce(settings, Topics.INTERACTIONS, [event])  # a retry after a restart too
    flow.run()
    assert online(settings, ["item_stats:likes"], item_id="m1")["likes"] == 1
    assert online(settings, ["user_long_term:total_events"], user_id="u1")["total_events"] == 1


def test_the_source_reports_how_far_behind_the_log_it_reads(settings: Settings) -> None:
    # Records produced an hour ago (their broker timestamp says so) put the flow an hour
    # behind, so it batches its writes; once its polls stay empty it is caught up again.
    topic = settings.topic(Topics.INTERACTIONS)
    hour_ago_ms = int(time.time() * 1000) - 3_600_000
    producer = Producer(producer_config(settings, **{"message.timeout.ms": 10_000}))
    for minute in range(5):
        key, value = like("u1", "m1", minute)
        producer.produce(topic, key=key.encode(), value=value, timestamp=hour_ago_ms + minute)
    assert producer.flush(10) == 0
    source = kafka_source(settings, [topic], tail=False)
    parts = [source.build_part("read_log", name, None) for name in source.list_parts()]
    try:
        read, deadline = 0, time.monotonic() + 15
        while read < 5 and time.monotonic() < deadline:  # the consumer connects and fetches meanwhile
            read += sum(len(part.next_batch()) for part in parts if not part.eof)
            time.sleep(0.02)
        assert read == 5
        assert 3590 < ReadLag.current() < 3700
        for part in parts:  # polls that find nothing new (past the end of the log)
            part.eof = False
            part.next_batch()
        assert ReadLag.current() > 3590  # one empty poll may be a fetch in flight
        time.sleep(ReadLag.IDLE_S + 0.05)
        assert ReadLag.current() == 0.0
    finally:
        for part in parts:
            part.close()
    assert ReadLag.current() == 0.0


def test_malformed_records_go_to_dead_letter_with_reason_and_are_counted(settings: Settings, flow: FlowRunner) -> None:
    produce(settings, Topics.INTERACTIONS, [
        ("u1", b"{not json"),
        ("u1", orjson.dumps({"user_id": "u1", "item_id": "m1", "interaction_type": "love",
                             "timestamp": "2024-05-01T12:00:00Z"})),
        like("u1", "m1", 0),
    ])
    produce(settings, Topics.CATALOG_ITEMS, [("m9", orjson.dumps({"item_id": "m9", "colour": "red"}))])
    flow.run()
    letters = read_topic(settings, Topics.DEAD_LETTER, 3)
    reasons = sorted(letter["reason"] for _, letter in letters)
    assert len(letters) == 3 and all(letter["source"] == "features" for _, letter in letters)
    assert any("interaction_type" in r for r in reasons)
    assert any("colour" in r and "ItemRecord" in r for r in reasons)
    assert any("Invalid JSON" in r for r in reasons)
    stats = redis.Redis.from_url(settings.redis.url).hgetall(settings.keys.flow_stats("features"))
    assert stats[b"dead_letters"] == b"3"
    # The flow kept running: the good event behind the bad ones was applied.
    assert online(settings, ["user_long_term:total_likes"], user_id="u1")["total_likes"] == 1


def test_debug_endpoints_show_values_and_update_times(settings: Settings, flow: FlowRunner,
                                                      auth_headers: dict[str, str]) -> None:
    from serving.app import create_app

    produce(settings, Topics.CATALOG_ITEMS, [item("m1", "Drama")])
    flow.run()
    produce(settings, Topics.INTERACTIONS, [like("u1", "m1", 0)])
    flow.run()
    with TestClient(create_app(settings)) as client:
        user = client.get("/users/u1/features", headers=auth_headers)
        assert user.status_code == 200, user.text
        short = user.json()["views"]["user_short_term"]
        assert short["recent_items"]["value"] == ["m1"]
        assert short["recent_items"]["updated_at"].startswith("2024-05-01T12:00")
        assert user.json()["serving"]["features"]["consumed"] == ["m1"]
        item_body = client.get("/items/m1/features", headers=auth_headers).json()
        assert item_body["views"]["item_stats"]["likes"]["value"] == 1
        assert item_body["views"]["item_metadata"]["category"]["value"] == "Drama"
        assert client.get("/items/nope/features", headers=auth_headers).status_code == 404
        assert client.get("/items/m1/features").status_code == 401


# -- kill -9 mid-stream + restart == an uninterrupted run ----------------------------------
N_USERS, N_ITEMS, N_EVENTS = 200, 300, 10_000


def _events() -> list[tuple[str, bytes]]:
    kinds = ["view", "click", "like", "watch", "skip"]
    out = []
    for i in range(N_EVENTS):
        user, item_id = f"u{i % N_USERS}", f"m{(i * 7919) % N_ITEMS}"
        event = InteractionEvent(event_id=f"e{i}", user_id=user, item_id=item_id, interaction_type=kinds[i % 5],
                                 interaction_value=float(i % 90) if i % 5 == 3 else None,
                                 region="us-west" if i % 3 else "ca", timestamp=1_714_564_800 + i)
        out.append((user, event.to_json()))
    return out


def _flow_env(settings: Settings) -> dict[str, str]:
    env = {**os.environ, "RECSYS_ENVIRONMENT": settings.environment}
    for section in ("kafka", "redis", "features"):
        for name, value in getattr(settings, section).model_dump().items():
            env[f"RECSYS_{section.upper()}__{name.upper()}"] = str(value)
    return env


def _start(settings: Settings, recovery: Path, *scale: str) -> subprocess.Popen[bytes]:
    log = (recovery.parent / f"{recovery.name}.log").open("ab")
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "bytewax.run", "flows.features:build_flow()", "-r", str(recovery), "-s", "1", "-b", "0",
         *scale], cwd=ROOT, env=_flow_env(settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


class _Group:
    """Several flow processes (-i/-a) seen as one: alive while all are."""

    def __init__(self, processes: list[subprocess.Popen[bytes]]) -> None:
        self.processes = processes
        self.pid = processes[0].pid

    def poll(self) -> int | None:
        codes = [p.poll() for p in self.processes]
        return next((c for c in codes if c is not None), None)

    def kill(self, sig: int) -> None:
        for process in self.processes:
            os.killpg(process.pid, sig)
            process.wait(10)


def _start_group(settings: Settings, recovery: Path, processes: int) -> _Group:
    if processes == 1:
        return _Group([_start(settings, recovery)])
    from tests.conftest import free_port

    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    return _Group([_start(settings, recovery, "-i", str(i), "-a", addresses) for i in range(processes)])


def _snapshot(settings: Settings) -> dict[str, object]:
    client = redis.Redis.from_url(settings.redis.url)
    docs = {}
    for key in client.scan_iter(f"{settings.redis.key_prefix}*features:*", count=1000):
        docs[key.decode().removeprefix(settings.redis.key_prefix)] = orjson.loads(client.get(key))
    for region in (None, "us-west", "ca"):
        docs[f"trending:{region}"] = client.zrange(settings.keys.trending(region), 0, -1, withscores=True)
    return docs


def _events_done(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.redis.url)
    keys = [settings.keys.user_features(f"u{u}") for u in range(N_USERS)]
    return sum(orjson.loads(raw)["total_events"] for raw in client.mget(keys) if raw)


def _item_events_done(settings: Settings) -> int:
    """Events counted in the item documents (they flush on their own ticks, after the users' may)."""
    client = redis.Redis.from_url(settings.redis.url)
    keys = [settings.keys.item_features(f"m{i}") for i in range(N_ITEMS)]
    return sum(sum(doc.get(k, 0) for k in ("views", "clicks", "likes", "watches", "skips"))
               for doc in (orjson.loads(raw) for raw in client.mget(keys) if raw))


def _wait(condition, timeout_s: float, process: _Group, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"flow did not get there in time: {log.read_text(errors='replace')[-2000:]}"
        time.sleep(0.1)


def _run_case(settings: Settings, recovery: Path, kill_at: int | None, processes: int = 1) -> dict[str, object]:
    recovery.mkdir()
    log = recovery.parent / f"{recovery.name}.log"
    process = _start_group(settings, recovery, processes)
    try:
        produce(settings, Topics.CATALOG_ITEMS, [item(f"m{i}", f"cat{i % 9}") for i in range(N_ITEMS)])
        client = redis.Redis.from_url(settings.redis.url)
        _wait(lambda: client.exists(settings.keys.item_features(f"m{N_ITEMS - 1}")), 90, process, log)
        time.sleep(1.5)  # let a snapshot of the catalog state land
        produce(settings, Topics.INTERACTIONS, _events())
        if kill_at is not None:
            _wait(lambda: _events_done(settings) >= kill_at, 90, process, log)
            process.kill(signal.SIGKILL)
            process = _start_group(settings, recovery, processes)
        # Wait on the data, not the clock: under load a flush tick stretches past any fixed sleep.
        _wait(lambda: _events_done(settings) >= N_EVENTS and _item_events_done(settings) >= N_EVENTS,
              120, process, log)
        time.sleep(2 * settings.features.flush_interval_s + 0.5)  # trending and stats written in the same tick
    finally:
        process.kill(signal.SIGTERM)
    return _snapshot(settings)


def _same(a: object, b: object) -> bool:
    # Item state sees events from several partitions interleaved differently per run,
    # so float sums may differ in the last bits; everything else must be equal.
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture
def own_broker(settings: Settings, tmp_path: Path):
    """A broker of this test's own: it runs for a minute and must not share a pid file with anyone."""
    from infra.kafka import ensure_topics
    from infra.stack import EmbeddedStack
    from tests.conftest import free_port

    port = free_port()
    isolated = settings.model_copy(deep=True)
    isolated.kafka.bootstrap_servers = f"127.0.0.1:{port}"
    isolated.stack.broker_listen = f"127.0.0.1:{port}"
    isolated.stack.state_dir = tmp_path / "stack"
    stack = EmbeddedStack(isolated)
    stack.start(stack.broker())
    ensure_topics(isolated)
    yield isolated
    stack.stop("broker")


def test_kill_9_mid_stream_and_restart_gives_identical_features(own_broker: Settings, tmp_path: Path) -> None:
    settings = own_broker
    uninterrupted = _run_case(settings, tmp_path / "a", kill_at=None)
    other = settings.model_copy(deep=True)
    other.kafka.topic_prefix = "k" + settings.kafka.topic_prefix
    other.redis.key_prefix = "k" + settings.redis.key_prefix
    other.__dict__.pop("keys", None)
    from infra.kafka import ensure_topics

    ensure_topics(other)
    restarted = _run_case(other, tmp_path / "b", kill_at=N_EVENTS // 3)
    assert len(uninterrupted) == N_USERS + N_ITEMS + 3
    different = [k for k in uninterrupted if not _same(uninterrupted[k], restarted.get(k))]
    if different:
        first_a, first_b = uninterrupted[different[0]], restarted.get(different[0])
        fields = [k for k in first_a if not _same(first_a[k], (first_b or {}).get(k))] if isinstance(first_a, dict) else []
        detail = {k: (first_a[k], (first_b or {}).get(k)) for k in fields[:4]}
        raise AssertionError(f"{len(different)} documents differ, e.g. {different[:3]}: {detail}")
    feast_a = online(settings, ["user_long_term:total_events", "user_short_term:affinity_scores"], user_id="u5")
    feast_b = online(other, ["user_long_term:total_events", "user_short_term:affinity_scores"], user_id="u5")
    assert _same(feast_a, feast_b) and feast_a["total_events"] == N_EVENTS // N_USERS


def _other(settings: Settings, tag: str) -> Settings:
    from infra.kafka import ensure_topics

    other = settings.model_copy(deep=True)
    other.kafka.topic_prefix = tag + settings.kafka.topic_prefix
    other.redis.key_prefix = tag + settings.redis.key_prefix
    other.__dict__.pop("keys", None)
    ensure_topics(other)
    return other


def test_two_processes_give_the_same_features_as_one(own_broker: Settings, tmp_path: Path) -> None:
    """Scale-out (-i/-a over the partitions), killed and restarted as a group, ends where one process does."""
    one = _run_case(own_broker, tmp_path / "one", kill_at=None)
    two = _run_case(_other(own_broker, "s"), tmp_path / "two", kill_at=N_EVENTS // 2, processes=2)
    different = [k for k in one if not _same(one[k], two.get(k))]
    assert len(one) == N_USERS + N_ITEMS + 3 and not different, different[:3]
