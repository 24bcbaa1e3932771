"""Chaos harness: real processes of our own (Redis, broker, object store) that a test may kill.

Shared services (the session broker, the local Redis on 6379, the Milvus server)
are never stopped here: a scenario that kills something starts its own copy on
a free port. Every scenario records what clients saw (requests, status codes,
events acknowledged vs found in the log) into one reliability report,
written to bench/results/reliability.json at the end of the session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from bench._common import machine
from infra.kafka import consumer_config
from schemas.topics import Topics
from serving.config import Settings
from tests.conftest import ROOT, free_port

REPORT_PATH = ROOT / "bench" / "results" / "reliability.json"


@dataclass
class Phase:
    """What clients saw during one phase of a scenario (healthy, outage, recovered)."""

    name: str
    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    acked_event_ids: list[str] = field(default_factory=list)
    max_latency_s: float = 0.0

    def record(self, route: str, status: int, elapsed_s: float) -> None:
        self.requests += 1
        self.by_status[f"{route} {status}"] += 1
        self.max_latency_s = max(self.max_latency_s, elapsed_s)

    def as_dict(self) -> dict[str, object]:
        return {"requests": self.requests, "responses": dict(sorted(self.by_status.items())),
                "events_acknowledged": len(self.acked_event_ids),
                "max_latency_ms": round(self.max_latency_s * 1000, 1)}


@dataclass
class Scenario:
    name: str
    fault: str
    phases: list[Phase] = field(default_factory=list)
    events_found_in_log: int | None = None
    acknowledged_but_lost: int | None = None
    notes: list[str] = field(default_factory=list)

    def phase(self, name: str) -> Phase:
        self.phases.append(Phase(name))
        return self.phases[-1]

    @property
    def acked(self) -> set[str]:
        return {event_id for phase in self.phases for event_id in phase.acked_event_ids}

    def as_dict(self) -> dict[str, object]:
        return {"fault": self.fault, "phases": {p.name: p.as_dict() for p in self.phases},
                "events_acknowledged": len(self.acked), "events_found_in_log": self.events_found_in_log,
                "acknowledged_but_lost": self.acknowledged_but_lost, "notes": self.notes}


class ReliabilityReport:
    def __init__(self) -> None:
        self.scenarios: dict[str, Scenario] = {}

    def scenario(self, name: str, fault: str) -> Scenario:
        self.scenarios[name] = Scenario(name, fault)
        return self.scenarios[name]

    def write(self, path: Path = REPORT_PATH) -> None:
        if not self.scenarios:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Scenarios not run this time (a -k selection) keep their last figures.
        scenarios = json.loads(path.read_text()).get("scenarios", {}) if path.exists() else {}
        for name, scenario in self.scenarios.items():
            scenarios[name] = {**scenario.as_dict(),
                               "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
        body = {"machine": machine(), "command": "pytest tests/chaos (part of make test)",
                "scenarios": dict(sorted(scenarios.items()))}
        path.write_text(json.dumps(body, indent=2) + "\n")


@pytest.fixture(scope="session")
def reliability() -> Iterator[ReliabilityReport]:
    report = ReliabilityReport()
    yield report
    report.write()


class OwnRedis:
    """A redis-server of our own on a free port, with an append-only file so a restart keeps data."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server not installed")
        self.process = subprocess.Popen(  # noqa: S603
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("own redis-server did not start")

    def kill(self) -> None:
        """kill -9: the process gets no chance to answer anything again."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def event(scenario: str, i: int) -> dict[str, object]:
    return {"event_id": f"{scenario}-{i}-{uuid.uuid4().hex[:6]}", "user_id": f"u{i % 17}",
            "item_id": f"i{i % 29}", "interaction_type": "click"}


def event_ids_in_log(settings: Settings, wanted: set[str], timeout_s: float = 20.0) -> set[str]:
    """Event ids found on the interactions topic (reads until all wanted are seen or time is up)."""
    topic = settings.topic(Topics.INTERACTIONS)
    consumer = Consumer(consumer_config(settings, f"chaos-reader-{uuid.uuid4().hex}"))
    partitions = [TopicPartition(topic, p, 0) for p in range(Topics.INTERACTIONS.partitions)]
    consumer.assign(partitions)
    found: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while not wanted <= found and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.5):
                if message.error() is None:
                    found.add(orjson.loads(message.value())["event_id"])
    finally:
        consumer.close()
    return found
