"""The Kappa log on disk: interactions and impressions -> Parquet files partitioned by date.

In:  topics interactions (InteractionEvent) and impressions (ImpressionRecord).
Out: ``{features.archive_url}/{interactions|impressions}/date=YYYY-MM-DD/p{PPP}-{FIRST}-{LAST}.parquet``
     (date of the event time, UTC; PPP the Kafka partition; FIRST/LAST the
     offsets the file covers, zero-padded). The URL is a local folder
     (default ``.recsys/archive``) or ``s3://bucket/prefix`` (pyarrow's S3
     filesystem; endpoint and credentials from the usual AWS_* variables).

    python -m bytewax.run "flows.archive:build_flow()" -r .recsys/recovery/archive -s 5 -b 30

Columns: interactions have exactly the field names of ``InteractionEvent``
(event_id, user_id, item_id, interaction_type, interaction_value, surface,
device, region, timestamp [timestamp(us, UTC)], request_id, position);
impressions those of ``ImpressionRecord``; both add ``partition`` and
``offset`` (the position in the log). ``read_archive`` gives them back as
records, in time order.

No duplicates, also across restarts: each Kafka partition is buffered in
recoverable state and flushed every ``archive_max_rows`` rows or
``archive_flush_s`` seconds; a file is named by the offsets it covers, and
writing it removes any older file of that partition overlapping the range
(what a crash between a flush and the next snapshot leaves behind), so a
replay replaces files instead of adding rows. Event ids already written from a
partition are remembered (bounded) to drop at-least-once producer retries.
Files appear whole (local: written to a temporary name, then renamed; S3: one PUT).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import bytewax.operators as op
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import StatelessSinkPartition

from flows._common import (
    FlowIO,
    PartitionPerWorker,
    dead_letter_sink,
    ensure_recovery_dir,
    kafka_source,
    parse_with,
    route_dead_letters,
    to_message,
)
from schemas.events import ImpressionRecord, InteractionEvent
from schemas.topics import Topics
from serving.config import FeatureSettings, Settings, load_settings

FLOW_NAME = "archive"
KINDS = {"interactions": InteractionEvent, "impressions": ImpressionRecord}
# Event ids remembered per partition to drop producer retries (they land in the same partition).
DEDUP_IDS = 100_000
FILE_RE = re.compile(r"^p(\d+)-(\d+)-(\d+)\.parquet$")

_TS = pa.timestamp("us", tz="UTC")
SCHEMAS = {
    "interactions": pa.schema([
        ("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
        ("interaction_type", pa.string()), ("interaction_value", pa.float64()), ("surface", pa.string()),
        ("device", pa.string()), ("region", pa.string()), ("timestamp", _TS), ("request_id", pa.string()),
        ("position", pa.int64()), ("partition", pa.int32()), ("offset", pa.int64()),
    ]),
    "impressions": pa.schema([
        ("request_id", pa.string()), ("user_id", pa.string()), ("surface", pa.string()),
        ("item_ids", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())), ("served_from", pa.string()),
        ("device", pa.string()), ("region", pa.string()), ("timestamp", _TS),
        ("partition", pa.int32()), ("offset", pa.int64()),
    ]),
}


def record_id(kind: str, record: Any) -> str:
    return record.event_id if kind == "interactions" else record.request_id


def to_row(record: Any, partition: int, offset: int) -> dict[str, Any]:
    row = record.model_dump(mode="python")
    for name, value in row.items():
        if hasattr(value, "value") and not isinstance(value, datetime):  # enums -> their string
            row[name] = value.value
    row["timestamp"] = record.timestamp.astimezone(UTC)
    row["partition"], row["offset"] = partition, offset
    return row


# -- buffer per Kafka partition ----------------------------------------------------------
@dataclass
class Buffer:
    rows: list[dict[str, Any]] = field(default_factory=list)
    first_offset: int = -1
    last_offset: int = -1
    written_ids: OrderedDict[str, None] = field(default_factory=OrderedDict)
    kind: str = ""
    partition: int = -1


class BufferLogic(StatefulBatchLogic[Any, Any, Buffer]):
    """(kind:partition) (kind, partition, offset, record) -> (kind, partition, first, last, rows) on flush."""

    def __init__(self, cfg: FeatureSettings, state: Buffer | None) -> None:
        self.cfg = cfg
        self.state = state or Buffer()
        self.next_flush: datetime | None = datetime.now(UTC) if self.state.rows else None

    def on_batch(self, values: list[Any]) -> tuple[Iterable[Any], bool]:
        out: list[Any] = []
        s = self.state
        for kind, partition, offset, record in values:
            s.kind, s.partition = kind, partition
            if s.first_offset < 0:
                s.first_offset = offset
            s.last_offset = max(s.last_offset, offset)
            rid = record_id(kind, record)
            if rid in s.written_ids:
                continue
            s.written_ids[rid] = None
            if len(s.written_ids) > DEDUP_IDS:
                s.written_ids.popitem(last=False)
            s.rows.append(to_row(record, partition, offset))
            if len(s.rows) >= self.cfg.archive_max_rows:
                out.extend(self._flush())
        if s.rows and self.next_flush is None:
            self.next_flush = datetime.now(UTC) + timedelta(seconds=self.cfg.archive_flush_s)
        return out, self.RETAIN

    def _flush(self) -> list[Any]:
        s = self.state
        self.next_flush = None
        if not s.rows:
            return []
        out = [(s.kind, s.partition, s.first_offset, s.last_offset, s.rows)]
        s.rows, s.first_offset, s.last_offset = [], -1, -1
        return out

    def on_notify(self) -> tuple[Iterable[Any], bool]:
        return self._flush(), self.RETAIN

    def on_eof(self) -> tuple[Iterable[Any], bool]:
        return self._flush(), self.RETAIN

    def notify_at(self) -> datetime | None:
        return self.next_flush

    def snapshot(self) -> Buffer:
        s = self.state
        return Buffer(list(s.rows), s.first_offset, s.last_offset, OrderedDict(s.written_ids), s.kind, s.partition)


# -- the writer ---------------------------------------------------------------------------
def archive_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local folder or any URL pyarrow knows (s3://...)."""
    if "://" in url:
        return pafs.FileSystem.from_uri(url)
    from pathlib import Path

    return pafs.LocalFileSystem(), str(Path(url).resolve())


class _ArchivePartition(StatelessSinkPartition[Any]):
    """Rows of one worker -> Parquet files by date (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.fs, self.root = archive_filesystem(settings.features.archive_url)

    def write_batch(self, items: list[Any]) -> None:
        for kind, partition, first, last, rows in items:
            by_day: dict[date, list[dict[str, Any]]] = {}
            for row in rows:
                by_day.setdefault(row["timestamp"].date(), []).append(row)
            for day, day_rows in sorted(by_day.items()):
                self._write(kind, partition, first, last, day, day_rows)

    def _write(self, kind: str, partition: int, first: int, last: int, day: date,
               rows: list[dict[str, Any]]) -> None:
        folder = f"{self.root}/{kind}/date={day.isoformat()}"
        name = f"p{partition:03d}-{first:012d}-{last:012d}.parquet"
        self.fs.create_dir(folder, recursive=True)
        rows.sort(key=lambda r: r["offset"])
        table = pa.Table.from_pylist(rows, schema=SCHEMAS[kind])
        # Object stores make a PUT visible whole; a local file needs write-then-rename.
        local = isinstance(self.fs, pafs.LocalFileSystem)
        tmp = f"{folder}/.{name}.tmp" if local else f"{folder}/{name}"
        pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
        # A replay after a crash re-flushes from the last snapshot with other batch
        # boundaries: drop files of this partition whose range overlaps this one.
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            match = FILE_RE.match(info.base_name)
            if match and info.base_name != name and int(match.group(1)) == partition:
                lo, hi = int(match.group(2)), int(match.group(3))
                if lo <= last and hi >= first:
                    self.fs.delete_file(info.path)
        if local:
            self.fs.move(tmp, f"{folder}/{name}")


# -- the dataflow -------------------------------------------------------------------------
def default_io(settings: Settings, tail: bool = True) -> FlowIO:
    topics = [settings.topic(Topics.INTERACTIONS), settings.topic(Topics.IMPRESSIONS)]
    return FlowIO(source=kafka_source(settings, topics, tail=tail), dead_letters=dead_letter_sink(settings),
                  outputs={"archive": PartitionPerWorker(settings, _ArchivePartition)})


def build_flow(settings: Settings | None = None, io: FlowIO | None = None, tail: bool = True) -> Dataflow:
    """The archive dataflow; ``tail=False`` stops at the end of the log."""
    settings = settings or load_settings()
    cfg = settings.features
    if io is None:
        ensure_recovery_dir(cfg.recovery_partitions)
        io = default_io(settings, tail=tail)
    interactions, impressions = settings.topic(Topics.INTERACTIONS), settings.topic(Topics.IMPRESSIONS)
    kind_of = {interactions: "interactions", impressions: "impressions"}
    parse = parse_with({interactions: InteractionEvent, impressions: ImpressionRecord}, FLOW_NAME)

    flow = Dataflow(FLOW_NAME)
    messages = op.map("to_message", op.input("read_log", flow, io.source), to_message)
    parsed = op.map("parse_record", messages, lambda m: (m, parse(m)))
    ok = op.branch("split_dead_letters", parsed, lambda mp: mp[1][0] == "ok")
    # Bad interactions are dead-lettered by flows/features; bad impressions are ours.
    dead = op.filter_map("dead_impression", ok.falses,
                         lambda mp: mp[1][1] if mp[0].topic == impressions else None)
    route_dead_letters(settings, FLOW_NAME, dead, io.dead_letters)
    rows = op.map("tag_partition", ok.trues,
                  lambda mp: (kind_of[mp[0].topic], mp[0].partition, mp[0].offset, mp[1][1][1]))
    keyed = op.key_on("key_by_partition", rows, lambda r: f"{r[0]}:{r[1]}")
    files = op.stateful_batch("buffer_rows", keyed, lambda state: BufferLogic(cfg, state))
    op.output("write_parquet", op.map("drop_key", files, lambda kv: kv[1]), io.outputs["archive"])
    return flow


# -- reading it back ----------------------------------------------------------------------
def _read_file(fs: pafs.FileSystem, path: str) -> pa.Table:
    # One whole GET, no ranged reads: every S3-compatible store serves that the same way.
    with fs.open_input_stream(path) as stream:
        return pq.read_table(pa.BufferReader(stream.read()))


def read_archive(settings: Settings, start: datetime | None = None, end: datetime | None = None,
                 kind: str = "interactions") -> Iterator[Any]:
    """Records from the archive with start <= timestamp < end, in time order, each event_id once."""
    fs, root = archive_filesystem(settings.features.archive_url)
    base = f"{root}/{kind}"
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return
    days = sorted(info.base_name.removeprefix("date=") for info in fs.get_file_info(pafs.FileSelector(base))
                  if info.base_name.startswith("date="))
    model = KINDS[kind]
    fields = set(model.model_fields)
    seen: set[str] = set()
    for day in days:
        if (start and day < start.astimezone(UTC).date().isoformat()) or (
                end and day > end.astimezone(UTC).date().isoformat()):
            continue
        folder = f"{base}/date={day}"
        tables = [_read_file(fs, info.path) for info in fs.get_file_info(pafs.FileSelector(folder))
                  if FILE_RE.match(info.base_name)]
        if not tables:
            continue
        rows = pa.concat_tables(tables).sort_by([("timestamp", "ascending"), ("partition", "ascending"),
                                                  ("offset", "ascending")]).to_pylist()
        for row in rows:
            ts = row["timestamp"]
            if (start and ts < start) or (end and ts >= end):
                continue
            rid = row.get("event_id") or row.get("request_id")
            if rid in seen:
                continue
            seen.add(rid)
            yield model.model_validate({k: v for k, v in row.items() if k in fields and v is not None})
