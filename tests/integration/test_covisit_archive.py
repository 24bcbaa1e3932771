"""flows/covisit, trending (flows/features) and flows/archive on the real broker and Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis
import redis.asyncio as aioredis
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main

from flows import archive, covisit, features
from schemas.events import ImpressionRecord, InteractionEvent
from schemas.topics import Topics
from serving.config import Settings
from serving.features import OnlineFeatures
from tests.integration.test_features import item, produce

pytestmark = pytest.mark.integration


def consume(user: str, item_id: str, minute: int, kind: str = "view", region: str | None = None) -> tuple[str, bytes]:
    event = InteractionEvent(event_id=f"{user}-{item_id}-{minute}", user_id=user, item_id=item_id,
                             interaction_type=kind, region=region, timestamp=1_714_564_800 + 60 * minute)
    return user, event.to_json()


def run(module, settings: Settings, recovery: Path | None = None) -> None:
    config = RecoveryConfig(str(recovery)) if recovery else None
    run_main(module.build_flow(settings, tail=False), recovery_config=config)


def test_items_consumed_together_are_neighbours_best_first(settings: Settings) -> None:
    events = []
    for u in range(6):  # a and b together for six users; a and c for two of them
        events += [consume(f"u{u}", "a", 0), consume(f"u{u}", "b", 5)]
        if u < 2:
            events.append(consume(f"u{u}", "c", 10))
    events += [consume("u9", "c", 0), consume("u9", "d", 60 * 24 * 3)]  # three days apart: no pair
    events += [consume("u1", "b", 6), consume("u1", "b", 6)]  # repeats add nothing
    produce(settings, Topics.INTERACTIONS, events)
    run(covisit, settings)

    async def read():
        client = aioredis.Redis.from_url(settings.redis.url)
        try:
            reader = OnlineFeatures(settings, client)
            return {i: await reader.neighbours(i) for i in "abcd"}
        finally:
            await client.aclose()

    neighbours = asyncio.run(read())
    assert [n for n, _ in neighbours["a"]] == ["b", "c"]
    # cosine: 6 co-visits / sqrt(6 users * 6 users) = 1.0
    assert neighbours["a"][0][1] == pytest.approx(1.0)
    assert neighbours["a"][1][1] < neighbours["a"][0][1]
    assert [n for n, _ in neighbours["b"]][0] == "a"
    assert {n for n, _ in neighbours["c"]} == {"a", "b"}  # u9's c has no neighbour within the window
    assert neighbours["d"] == []


def test_trending_is_global_and_per_region_with_time_decay(settings: Settings, tmp_path: Path) -> None:
    recovery = tmp_path / "rec"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    produce(settings, Topics.CATALOG_ITEMS, [item(i, "Drama") for i in ("old", "new", "local")])
    run(features, settings, recovery)
    # "old" got 5 views two days before "new" got 3: decay (24 h half-life) ranks "new" first.
    events = [consume(f"u{u}", "old", 0) for u in range(5)]
    events += [consume(f"w{u}", "new", 60 * 48) for u in range(3)]
    events += [consume("x1", "local", 60 * 48, kind="like", region="ca")]
    produce(settings, Topics.INTERACTIONS, events)
    run(features, settings, recovery)
    client = redis.Redis.from_url(settings.redis.url)
    top = [m.decode() for m in client.zrevrange(settings.keys.trending(None), 0, -1)]
    assert top[0] == "new" and set(top) == {"old", "new", "local"}
    assert [m.decode() for m in client.zrevrange(settings.keys.trending("ca"), 0, -1)] == ["local"]


def test_archive_is_parquet_by_date_and_a_full_replay_adds_no_duplicates(settings: Settings, tmp_path: Path) -> None:
    settings.features.archive_url = str(tmp_path / "archive")
    settings.features.archive_max_rows = 70
    n = 500
    events = [(f"u{i % 13}", InteractionEvent(event_id=f"e{i}", user_id=f"u{i % 13}", item_id=f"m{i % 31}",
                                              interaction_type="watch", interaction_value=float(i),
                                              timestamp=1_714_564_800 + i * 600).to_json()) for i in range(n)]
    produce(settings, Topics.INTERACTIONS, events)
    produce(settings, Topics.INTERACTIONS, events[:50])  # producer retries: same event ids again
    produce(settings, Topics.IMPRESSIONS, [("u1", ImpressionRecord(request_id="r1", user_id="u1", surface="homepage",
                                                                   item_ids=["m1", "m2"], served_from="live").to_json())])
    recovery = tmp_path / "rec"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    run(archive, settings, recovery)
    files = sorted((tmp_path / "archive" / "interactions").rglob("*.parquet"))
    assert {f.parent.name for f in files} == {"date=2024-05-01", "date=2024-05-02", "date=2024-05-03", "date=2024-05-04"}
    assert pq.read_schema(files[0]).names[:11] == list(InteractionEvent.model_fields)

    # Lose the recovery state and replay the whole log with other file boundaries.
    settings.features.archive_max_rows = 33
    run(archive, settings)
    rows = sum(pq.read_metadata(f).num_rows for f in (tmp_path / "archive" / "interactions").rglob("*.parquet"))
    assert rows == n
    replayed = list(archive.read_archive(settings))
    assert [e.event_id for e in replayed] == [f"e{i}" for i in range(n)]
    assert replayed[7].interaction_value == 7.0 and replayed[7].timestamp.tzinfo is not None
    [impression] = archive.read_archive(settings, kind="impressions")
    assert impression.item_ids == ["m1", "m2"]


@pytest.fixture
def s3_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An S3-compatible store (s3rver, as the durable broker uses) with a bucket, and its archive URL."""
    import subprocess
    import time

    from infra.durable import s3rver_binary
    from infra.stack import StackError, port_open
    from tests.conftest import free_port

    try:
        binary = s3rver_binary()
    except (StackError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no S3-compatible store here: {exc}")
    port = free_port()
    server = subprocess.Popen([binary, "-d", str(tmp_path / "s3"), "-a", "127.0.0.1", "-p", str(port), "-s",  # noqa: S603
                               "--configure-bucket", "archive"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not port_open("127.0.0.1", port):
        assert time.monotonic() < deadline and server.poll() is None, "s3rver did not start"
        time.sleep(0.1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "S3RVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3RVER")
    # s3rver does not decode the SDK's chunked uploads with trailing checksums (S3 and MinIO do).
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    yield f"s3://archive/recsys?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    server.terminate()
    server.wait(10)


def test_archive_to_an_s3_url_works_the_same(settings: Settings, s3_url: str) -> None:
    settings.features.archive_url = s3_url
    settings.features.archive_max_rows = 40
    events = [(f"u{i % 5}", InteractionEvent(event_id=f"s{i}", user_id=f"u{i % 5}", item_id="m1",
                                             interaction_type="view", timestamp=1_714_564_800 + i * 3600).to_json())
              for i in range(100)]
    produce(settings, Topics.INTERACTIONS, events)
    run(archive, settings)
    settings.features.archive_max_rows = 17
    run(archive, settings)  # a full replay with other file boundaries replaces, never adds
    assert [e.event_id for e in archive.read_archive(settings)] == [f"s{i}" for i in range(100)]
    import pyarrow.fs as pafs

    fs, root = archive.archive_filesystem(s3_url)
    files = [i for i in fs.get_file_info(pafs.FileSelector(f"{root}/interactions", recursive=True))
             if i.base_name.endswith(".parquet")]
    assert sum(archive._read_file(fs, f.path).num_rows for f in files) == 100
