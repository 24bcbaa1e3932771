"""Flow lag and freshness, measured from both ends of the log instead of the broker's watermark.

In: progress notes from the two ends of each topic. The API's publisher notes
the partition and offset of every event the broker acknowledged, with the time
of the ack; each flow notes every record it reads, with the record's broker
timestamp (set when it was produced). :class:`ProgressRecorder` keeps the
highest of each in memory and writes them to Redis once a second
(``RedisKeys.log_progress`` / ``log_progress_time``, ZADD GT: a restart, a
replay or a second replica can only raise them).
Out: at scrape time (GET /metrics), :func:`refresh_flow_gauges` sets

- ``recsys_flow_lag_records{flow}``: acknowledged records the flow has not read yet,
  summed over the partitions of the topics it reads;
- ``recsys_flow_lag_seconds{flow}``: how much older the newest record the flow has read
  is than the newest acknowledged one (0 when it has read everything);
- ``recsys_feature_freshness_seconds{state}``: age of the newest record each flow's
  state has taken in (grows while no events arrive; read it beside the lag);
- ``recsys_flow_dead_letters{flow}``: records the flow sent to the dead-letter topic.

Why not the broker's high watermark: the embedded broker's is not reliable
(DESIGN.md), and a watermark says nothing about time. Limits: only records
produced through our publisher are counted on the producing side, and a flow
notes a record when it reads it; its writes follow within its flush interval
(features: 0.2 s by default), so "read" is at most that far ahead of "visible".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from serving.config import Settings
from serving.metrics import FLOW_DEAD_LETTERS, FLOW_LAG_RECORDS, FLOW_LAG_SECONDS, FRESHNESS_SECONDS

log = logging.getLogger(__name__)

PRODUCER = "producer"


class ProgressRecorder:
    """Highest offset per partition and newest time per topic seen by one reader; flushed to Redis by a thread."""

    def __init__(self, settings: Settings, reader: str, interval_s: float = 1.0) -> None:
        self.keys = settings.keys
        self.reader = reader
        self.interval_s = interval_s
        self._client = redis.Redis.from_url(settings.redis.url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._offsets: dict[str, int] = {}
        self._times: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None

    def note(self, topic: str, partition: int, offset: int, time_ms: float) -> None:
        self._merge({f"{topic}:{partition}": offset}, {topic: time_ms})

    def note_messages(self, messages: Sequence[Any]) -> None:
        """Note a batch of read records (anything with topic, partition, offset, timestamp_ms); starts the writer."""
        if not messages:
            return
        offsets: dict[str, int] = {}
        times: dict[str, float] = {}
        for m in messages:
            member = f"{m.topic}:{m.partition}"
            offsets[member] = max(m.offset, offsets.get(member, -1))
            times[m.topic] = max(m.timestamp_ms, times.get(m.topic, 0.0))
        self._merge(offsets, times)
        self.start()

    def _merge(self, offsets: dict[str, int], times: dict[str, float]) -> None:
        """Raise the pending maxima (the one place they change)."""
        with self._lock:
            for member, offset in offsets.items():
                if offset > self._offsets.get(member, -1):
                    self._offsets[member] = offset
            for topic, t in times.items():
                if t > self._times.get(topic, 0.0):
                    self._times[topic] = t

    def start(self) -> ProgressRecorder:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=f"progress-{self.reader}", daemon=True)
                    self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.flush()

    def flush(self) -> None:
        with self._lock:
            offsets, times = self._offsets, self._times
            self._offsets, self._times = {}, {}
        if not offsets and not times:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            if offsets:
                pipe.zadd(self.keys.log_progress(self.reader), offsets, gt=True)
            if times:
                pipe.zadd(self.keys.log_progress_time(self.reader), times, gt=True)
            pipe.sadd(self.keys.log_progress_readers(), self.reader)
            pipe.execute()
            self._failing_since = None
        except (redis.RedisError, OSError) as exc:
            self._merge(offsets, times)  # kept for the next try (maxima stay maxima)
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning("progress_write_failed reader=%s error=%r", self.reader, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()


def flow_lag(produced: dict[str, float], read: dict[str, float], produced_time: dict[str, float],
             read_time: dict[str, float], now_ms: float) -> dict[str, float]:
    """Lag of one flow from the two sides' notes (pure; ``offsets`` keyed "topic:partition")."""
    topics = {member.rsplit(":", 1)[0] for member in read} | set(read_time)
    records = sum(max(0.0, offset - read.get(member, -1.0))
                  for member, offset in produced.items() if member.rsplit(":", 1)[0] in topics)
    behind = [max(0.0, produced_time[t] - read_time.get(t, 0.0)) for t in topics if t in produced_time]
    newest = max((read_time[t] for t in topics if t in read_time), default=None)
    return {
        "records": records,
        "seconds": (max(behind) / 1000) if behind else 0.0,
        "freshness_seconds": max(0.0, (now_ms - newest) / 1000) if newest is not None else float("nan"),
    }


async def refresh_flow_gauges(settings: Settings, client: aioredis.Redis) -> None:
    """Set the lag, freshness and dead-letter gauges of every flow that noted progress (called per scrape)."""
    keys = settings.keys
    flows = sorted(m.decode() if isinstance(m, bytes) else m
                   for m in await client.smembers(keys.log_progress_readers()))
    flows = [f for f in flows if f != PRODUCER]
    readers = [PRODUCER, *flows]
    async with client.pipeline(transaction=False) as pipe:
        for reader in readers:
            pipe.zrange(keys.log_progress(reader), 0, -1, withscores=True)
            pipe.zrange(keys.log_progress_time(reader), 0, -1, withscores=True)
        for flow in flows:
            pipe.hget(keys.flow_stats(flow), "dead_letters")
        replies = await pipe.execute()

    def as_dict(rows: list[Any]) -> dict[str, float]:
        return {(m.decode() if isinstance(m, bytes) else m): float(score) for m, score in rows}

    notes = {reader: (as_dict(replies[2 * i]), as_dict(replies[2 * i + 1])) for i, reader in enumerate(readers)}
    produced, produced_time = notes[PRODUCER]
    now_ms = time.time() * 1000
    for i, flow in enumerate(flows):
        read, read_time = notes[flow]
        if read or read_time:
            lag = flow_lag(produced, read, produced_time, read_time, now_ms)
            FLOW_LAG_RECORDS.labels(flow=flow).set(lag["records"])
            FLOW_LAG_SECONDS.labels(flow=flow).set(lag["seconds"])
            FRESHNESS_SECONDS.labels(state=flow).set(lag["freshness_seconds"])
        dead = replies[2 * len(readers) + i]
        FLOW_DEAD_LETTERS.labels(flow=flow).set(float(dead) if dead is not None else 0.0)
