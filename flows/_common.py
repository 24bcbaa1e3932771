"""Reusable pieces of the dataflows: Kafka source, record parsing, dead letters, Redis sinks.

In: Kafka messages (or ``Message`` tuples from a test source).
Out: parsed records, or ``DeadLetterRecord`` messages for the dead-letter topic
with a per-flow count kept in Redis (``RedisKeys.flow_stats``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import bytewax.operators as op
import orjson
import redis
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import FixedPartitionedSource, Source, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, Sink, StatelessSinkPartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient
from pydantic import BaseModel, ValidationError

from schemas.events import DeadLetterRecord
from schemas.topics import Topics
from serving.config import Settings
from serving.lag import ProgressRecorder


class Message(NamedTuple):
    """A record from the log, whatever the source (Kafka or a test)."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int = 0
    offset: int = 0
    timestamp_ms: float = 0.0  # the broker record's timestamp (set when it was produced)


@dataclass
class FlowIO:
    """Sources and sinks of a flow; tests swap them for TestingSource / TestingSink."""

    source: Source[Any]
    dead_letters: Sink[Any]
    outputs: dict[str, Sink[Any]] = field(default_factory=dict)


def kafka_source(settings: Settings, topics: Iterable[str], tail: bool = True) -> KafkaLog:
    """Every partition of ``topics``; offsets live in the bytewax recovery store."""
    return KafkaLog(settings.kafka.bootstrap_servers, list(topics), tail=tail,
                    batch_size=settings.features.kafka_batch_size,
                    fetch_wait_ms=settings.features.kafka_fetch_wait_ms)


# How long an empty partition is left alone before it is polled again: idle flows
# then cost next to nothing, at the price of this much added latency.
_IDLE_POLL = timedelta(milliseconds=5)


class _WorkerConsumer:
    """One librdkafka consumer for every partition one worker reads, demultiplexed per partition.

    A consumer per partition (bytewax's KafkaSource, and ours before) means a fetch
    session, a broker connection and a fetcher thread per partition: the stack's five
    flows held 39 of them, each asking the broker every ``fetch.wait.max.ms`` (20 ms)
    while idle, which kept the embedded broker at ~50% of a core doing nothing. One
    consumer per worker asks once for all its partitions.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.consumer = Consumer(config)
        self.parts: dict[tuple[str, int], _KafkaPartition] = {}

    def add(self, part: _KafkaPartition) -> None:
        self.parts[(part.topic, part.partition)] = part
        # assign(), not subscribe(): no consumer group; the offset is bytewax state.
        self.consumer.incremental_assign([TopicPartition(part.topic, part.partition, part.offset)])

    def remove(self, part: _KafkaPartition) -> bool:
        """Stop reading ``part``; True when it was the last one (the consumer is closed then)."""
        if self.parts.pop((part.topic, part.partition), None) is None:
            return not self.parts
        if not self.parts:
            self.consumer.close()
            return True
        self.consumer.incremental_unassign([TopicPartition(part.topic, part.partition)])
        return False

    def fill(self, max_messages: int) -> None:
        """One non-blocking consume; each message goes to its partition's queue (order kept)."""
        # Never block here: one worker polls many partitions in turn, and a blocking
        # poll on an idle one (a catalog topic) delays all the others.
        for msg in self.consumer.consume(max_messages, 0):
            part = self.parts.get((msg.topic(), msg.partition()))
            if part is None:
                error = msg.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    # Not tied to a partition we read (a consumer-wide error): don't drop it silently.
                    raise RuntimeError(f"error consuming from Kafka: {error}")
                continue
            part.queued.append(msg)
            part.awake = None


class _KafkaPartition(StatefulSourcePartition[Message, int]):
    """One Kafka partition read from an offset; its state is the next offset to read."""

    def __init__(self, shared: _WorkerConsumer, topic: str, partition: int, offset: int, batch_size: int,
                 on_close: Callable[[], None] = lambda: None) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.batch_size = batch_size
        self.eof = False
        self.awake: datetime | None = None
        self.queued: deque[Any] = deque()
        self.shared = shared
        self.on_close = on_close
        shared.add(self)

    def next_batch(self) -> list[Message]:
        if self.eof:
            raise StopIteration
        if not self.queued:
            self.shared.fill(self.batch_size)
        if not self.queued:
            self.awake = datetime.now(UTC) + _IDLE_POLL
            ReadLag.note_empty(self.topic, self.partition)
            return []
        self.awake = None
        batch = []
        queued = self.queued
        while queued and len(batch) < self.batch_size:
            msg = queued.popleft()
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self.eof = True  # emit this batch; stop at the next call
                    break
                # A broken partition must not stop the flow silently: raise (restart resumes).
                raise RuntimeError(f"error consuming from Kafka topic {self.topic!r}: {error}")
            batch.append(Message(self.topic, msg.key(), msg.value(), self.partition, msg.offset() or 0,
                                 msg.timestamp()[1]))
        if batch:
            self.offset = batch[-1].offset + 1
            ReadLag.note(self.topic, self.partition, batch[-1].timestamp_ms)
        else:  # only the end-of-partition marker: nothing new either
            ReadLag.note_empty(self.topic, self.partition)
        return batch

    def next_awake(self) -> datetime | None:
        return self.awake

    def snapshot(self) -> int:
        return self.offset

    def close(self) -> None:
        ReadLag.forget(self.topic, self.partition)
        if self.shared.remove(self):
            self.on_close()


class KafkaLog(FixedPartitionedSource[Message, int]):
    """Every partition of some topics as ``Message`` tuples, resumable from the recovery store.

    Unlike bytewax's KafkaSource it never blocks on an idle partition, asks the
    broker to answer a fetch within ``fetch_wait_ms`` (the embedded broker holds
    a fetch for the whole ``fetch.wait.max.ms`` when little data is waiting:
    librdkafka's default of 500 ms alone added ~250 ms to every event's latency),
    and builds no per-message objects beyond the ``Message`` tuple.
    """

    def __init__(self, brokers: str, topics: list[str], *, tail: bool = True, batch_size: int = 1000,
                 fetch_wait_ms: int = 20, starting_offset: int = OFFSET_BEGINNING) -> None:
        self.brokers = brokers
        self.topics = topics
        self.tail = tail
        self.batch_size = batch_size
        self.fetch_wait_ms = fetch_wait_ms
        self.starting_offset = starting_offset
        self._consumers: dict[int, _WorkerConsumer] = {}

    def list_parts(self) -> list[str]:
        """One input partition per Kafka partition, named ``"{partition}-{topic}"``."""
        client = AdminClient({"bootstrap.servers": self.brokers})
        parts: list[str] = []
        for topic in self.topics:
            # One topic at a time, as bytewax does: a broker that auto-creates topics does so.
            info = client.list_topics(topic, timeout=10).topics.get(topic)
            if info is None or info.error is not None:
                raise RuntimeError(f"cannot read Kafka topic {topic!r}: {info.error if info else 'missing'}")
            parts.extend(f"{partition}-{topic}" for partition in sorted(info.partitions))
        return parts

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _KafkaPartition:
        index, topic = for_part.split("-", 1)
        config = {
            "bootstrap.servers": self.brokers,
            "group.id": "BYTEWAX_IGNORED",  # required by librdkafka; offsets are bytewax state
            "enable.auto.commit": False,
            "enable.partition.eof": not self.tail,
            "fetch.wait.max.ms": self.fetch_wait_ms,
        }
        offset = self.starting_offset if resume_state is None else resume_state
        # Partitions are built and read on their worker's thread: one consumer per worker thread.
        worker = threading.get_ident()
        shared = self._consumers.get(worker)
        if shared is None:
            shared = self._consumers[worker] = _WorkerConsumer(config)
        return _KafkaPartition(shared, topic, int(index), offset, self.batch_size,
                               on_close=lambda: self._consumers.pop(worker, None))


def dead_letter_sink(settings: Settings) -> KafkaSink:
    return KafkaSink(brokers=[settings.kafka.bootstrap_servers], topic=settings.topic(Topics.DEAD_LETTER))


def to_message(raw: Any) -> Message:
    """KafkaSourceMessage (or a Message already) -> Message."""
    if isinstance(raw, Message):
        return raw
    stamp = getattr(raw, "timestamp", None)
    return Message(raw.topic, raw.key, raw.value, raw.partition or 0, raw.offset or 0,
                   float(stamp[1]) if stamp else 0.0)


def parse_with(models: dict[str, type[BaseModel]], source: str) -> Callable[[Message], tuple[str, Any]]:
    """topic -> model; returns ("ok", (topic, record)) or ("dead", DeadLetterRecord)."""

    def dead(message: Message, reason: str) -> tuple[str, Any]:
        return "dead", DeadLetterRecord.wrap(
            source=source, reason=reason, payload=message.value or b"", topic=message.topic,
            partition=message.partition, offset=message.offset,
            key=message.key.decode("utf-8", "replace") if message.key else None)

    def parse(message: Message) -> tuple[str, Any]:
        model = models.get(message.topic)
        if model is None:
            return dead(message, f"unexpected topic {message.topic}")
        if not message.value:
            return dead(message, "empty payload")
        try:
            return "ok", (message.topic, model.model_validate_json(message.value))
        except ValidationError as exc:
            reason = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}"
                               for e in exc.errors()[:5])
            return dead(message, f"invalid {model.__name__}: {reason}")

    return parse


class _CountLogic(StatefulBatchLogic[Any, Any, int]):
    """Counts dead letters in recoverable state, so a replay does not count twice."""

    def __init__(self, count: int | None) -> None:
        self.count = count or 0

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        self.count += len(values)
        return [(v, self.count) for v in values], self.RETAIN

    def snapshot(self) -> int:
        return self.count


def route_dead_letters(settings: Settings, flow_name: str, dead: Stream[DeadLetterRecord], sink: Sink[Any]) -> None:
    """Dead letters -> the dead-letter topic, and their count -> Redis flow stats."""
    keyed = op.key_on("key_dead_letters", dead, lambda _: "dead_letters")
    counted = op.stateful_batch("count_dead_letters", keyed, _CountLogic)  # ("dead_letters", (record, n))
    records = op.map("encode_dead_letter", counted,
                     lambda kv: KafkaSinkMessage(flow_name.encode(), kv[1][0].to_json()))
    op.output("dead_letter_out", records, sink)
    counts = op.map("dead_letter_count", counted, lambda kv: ("stat", "dead_letters", kv[1][1]))
    op.output("dead_letter_count_out", counts, RedisStatsSink(settings, flow_name))


def read_records(flow: Dataflow, flow_name: str, settings: Settings, io: FlowIO,
                 models: dict[str, type[BaseModel]], *, input_step: str = "read_log",
                 parse_step: str = "parse_record") -> Stream[tuple[str, Any]]:
    """The common head of a flow: read the log, parse by topic, dead-letter what fails.

    Returns the stream of ``(topic, record)`` for every record that parsed.
    """
    raw = op.input(input_step, flow, io.source)
    parse = parse_with(models, flow_name)
    # What this flow has read, for the flow-lag gauges of /metrics (serving/lag.py).
    progress = ProgressRecorder(settings, flow_name)

    def parse_batch(batch: list[Any]) -> list[tuple[str, Any]]:
        messages = [to_message(m) for m in batch]
        progress.note_messages(messages)
        return [parse(m) for m in messages]

    # One Python call per batch, not per message and step: this is every event's path
    # (a branch or a map calls Python once per item).
    parsed = op.flat_map_batch(parse_step, raw, parse_batch)  # ("ok", (topic, record)) | ("dead", DeadLetterRecord)
    route_dead_letters(settings, flow_name, op.flat_map_batch("dead_record", parsed, partial(_tagged, "dead")),
                       io.dead_letters)
    return op.flat_map_batch("record", parsed, partial(_tagged, "ok"))  # (topic, record)


def _tagged(tag: str, batch: list[tuple[str, Any]]) -> list[Any]:
    """The payloads of a batch of (tag, payload) pairs that carry ``tag``: a branch in one call per batch."""
    return [payload for kind, payload in batch if kind == tag]


class PartitionPerWorker(DynamicSink[Any]):
    """A sink whose every worker writes through its own ``partition(settings)``.

    Every sink of the flows has this shape; the partition class says what it writes.
    """

    def __init__(self, settings: Settings, partition: Callable[[Settings], StatelessSinkPartition[Any]]) -> None:
        self.settings = settings
        self.partition = partition

    def build(self, step_id: str, worker_index: int, worker_count: int) -> StatelessSinkPartition[Any]:
        return self.partition(self.settings)


class _StatsPartition(StatelessSinkPartition[Any]):
    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client = client
        self.key = key

    def write_batch(self, items: list[Any]) -> None:
        latest = {name: value for _, name, value in items}
        self.client.hset(self.key, mapping=latest)

    def close(self) -> None:
        self.client.close()


class RedisStatsSink(DynamicSink[Any]):
    """("stat", name, value) -> HSET flow_stats(flow) name value (overwrite: idempotent)."""

    def __init__(self, settings: Settings, flow_name: str) -> None:
        self.settings = settings
        self.flow_name = flow_name

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StatsPartition:
        return _StatsPartition(redis_client(self.settings), self.settings.keys.flow_stats(self.flow_name))


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.url, socket_timeout=5.0, socket_connect_timeout=5.0)


class ReadLag:
    """How far behind real time this process reads the log (a backlog: a restart, a burst, a replay).

    Each Kafka partition notes the age of the newest record of every batch it
    reads (now minus the record's broker timestamp). A partition whose polls have
    found nothing new for ``IDLE_S`` is caught up (0): a single empty poll is
    not enough, since under a backlog the local queue also runs dry while the
    next fetch is in flight. The features flow stretches its flush interval with
    the largest (flows/features.flush_interval): while it reads old records, a
    key's events coalesce into fewer writes, so each event costs less and the
    backlog drains sooner; the events it holds are late anyway.

    The timestamps are the producers' (CreateTime): a producer whose clock runs
    behind makes its records look old. Keep producer clocks in sync, or set the
    topic's ``message.timestamp.type`` to LogAppendTime (the broker's clock).
    """

    IDLE_S = 0.1  # several fetch waits (features.kafka_fetch_wait_ms)
    # (topic, partition) -> [age of the newest record read (s), time.monotonic() of the
    # first empty poll since (None while records keep coming)]
    _parts: dict[tuple[str, int], list[Any]] = {}

    @classmethod
    def note(cls, topic: str, partition: int, newest_ms: float) -> None:
        """A batch was read; its newest record was produced at ``newest_ms`` (epoch ms)."""
        cls._parts[(topic, partition)] = [max(0.0, time.time() - newest_ms / 1000) if newest_ms > 0 else 0.0, None]

    @classmethod
    def note_empty(cls, topic: str, partition: int) -> None:
        part = cls._parts.get((topic, partition))
        if part is not None and part[1] is None:
            part[1] = time.monotonic()

    @classmethod
    def forget(cls, topic: str, partition: int) -> None:
        cls._parts.pop((topic, partition), None)

    @classmethod
    def current(cls) -> float:
        """Seconds the most lagging partition this process reads is behind (0: all caught up)."""
        now = time.monotonic()
        # list(): one atomic copy, as other worker threads of the process may add partitions.
        return max((age for age, empty_since in list(cls._parts.values())
                    if empty_since is None or now - empty_since < cls.IDLE_S), default=0.0)


class WriteLoad:
    """How long this process's feature writes take lately (moving average, seconds).

    Stateful steps flush their keys every ``flush_interval_s``; when a flush's
    write takes longer than half of that, the interval stretches to twice the
    write time, so writing never starves event processing under a backlog (and
    batches grow, which makes each row cheaper), up to ``flush_interval_max_s``
    so freshness stays bounded however slow a write gets.
    """

    seconds: float = 0.0

    @classmethod
    def record(cls, seconds: float) -> None:
        cls.seconds = 0.7 * cls.seconds + 0.3 * seconds


def dumps(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


def ensure_recovery_dir(partitions: int) -> None:
    """Create the recovery partitions named by ``-r`` / BYTEWAX_RECOVERY_DIRECTORY on first start.

    bytewax.run parses its arguments before it calls ``build_flow``, and needs
    the partitions to exist; creating them here spares operators a separate
    ``python -m bytewax.recovery DIR N`` step.
    """
    directory = os.environ.get("BYTEWAX_RECOVERY_DIRECTORY")
    argv = sys.argv
    for flag in ("-r", "--recovery-directory"):
        if flag in argv[:-1]:
            directory = argv[argv.index(flag) + 1]
    if not directory:
        return
    import fcntl

    from bytewax.recovery import init_db_dir

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    # Processes of one scaled-out flow (-i/-a) start together: one creates, the others wait.
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not any(path.glob("part-*.sqlite3")):
            init_db_dir(path, partitions)
