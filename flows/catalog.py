"""Catalog items -> item tower -> Milvus, within seconds.

In:  topic catalog.items (ItemRecord; a delete is an explicit ``status="deleted"`` record).
Out: the live model version's Milvus collection: active items upserted with
     their vector and scalar fields, deleted/unavailable items removed at
     once; bad records -> dead-letter topic.

    python -m bytewax.run "flows.catalog:build_flow()"

No recovery store on purpose: every write is an overwrite keyed by item id,
so a restart simply replays the topic from the beginning and converges on
the same collection (and re-embeds every item with the live model, which is
what we want after a model swap anyway).

The vectors go to the collection of the version the encoding model belongs
to (from the registry), never to the alias: during a swap the alias may
already point at a version whose vector space is different. A refresh that
trained meanwhile replays the items changed during training into its own
collection (model/worker.py catch_up). Before the first model exists there is
nothing to embed with; the first refresh indexes the whole catalog.
"""

from __future__ import annotations

import logging

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import StatelessSinkPartition

from flows._common import (
    FlowIO,
    PartitionPerWorker,
    dead_letter_sink,
    kafka_source,
    read_records,
)
from schemas.catalog import ItemRecord
from schemas.topics import Topics
from serving.config import Settings, load_settings

log = logging.getLogger(__name__)
FLOW_NAME = "catalog"


class _MilvusItemsPartition(StatelessSinkPartition[ItemRecord]):
    """ItemRecord -> item tower -> upsert (or delete) in the live version's collection."""

    def __init__(self, settings: Settings) -> None:
        from infra.milvus import connect
        from model.registry import LiveModel

        self.settings = settings
        self.model = LiveModel(settings)
        self.client = connect(settings)
        self.skipped = 0

    def write_batch(self, items: list[ItemRecord]) -> None:
        from infra.milvus import upsert_items

        model = self.model()
        entry = self.model.entry
        if model is None or entry is None or not entry.collection:
            self.skipped += len(items)
            log.warning("catalog_items_not_indexed count=%d reason=no live model yet", len(items))
            return
        latest = list({item.item_id: item for item in items}.values())  # last record per item wins
        vectors = model.encode_items(latest)
        upsert_items(self.client, entry.collection, latest, vectors, [not model.knows(i.item_id) for i in latest])
        log.info("catalog_items_indexed count=%d version=%s", len(latest), entry.version)

    def close(self) -> None:
        self.client.close()


def default_io(settings: Settings, tail: bool = True) -> FlowIO:
    return FlowIO(
        source=kafka_source(settings, [settings.topic(Topics.CATALOG_ITEMS)], tail=tail),
        dead_letters=dead_letter_sink(settings),
        outputs={"items": PartitionPerWorker(settings, _MilvusItemsPartition)},
    )


def build_flow(settings: Settings | None = None, io: FlowIO | None = None, tail: bool = True) -> Dataflow:
    """The catalog dataflow; ``io`` swaps the Kafka source and the sinks (tests)."""
    settings = settings or load_settings()
    io = io or default_io(settings, tail=tail)
    flow = Dataflow(FLOW_NAME)
    records = read_records(flow, FLOW_NAME, settings, io, {settings.topic(Topics.CATALOG_ITEMS): ItemRecord},
                           input_step="read_catalog", parse_step="parse_item")
    items = op.map("item_record", records, lambda topic_record: topic_record[1])  # ItemRecord
    op.output("index_items", items, io.outputs["items"])
    return flow

