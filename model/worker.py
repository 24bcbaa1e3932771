"""The trainer: answers refresh commands on the control topic by retraining from the log.

    python -m model.worker                 # consume the control topic forever (make up)
    python -m model.worker --once          # train and publish one version now, then exit
    python -m model.worker --once --source archive

In: ``ControlCommand(command="refresh_model")`` records on the control topic;
the interactions log (topic or Parquet archive) and the catalog topics. Out: a
new model version: artefacts under ``<state_dir>/models/<version>``, a Milvus
collection with every active item's vector, the serving alias moved to it,
and the registry's ``live`` pointer moved in Redis. Older versions beyond
``model.keep_versions`` are dropped only after the swap, so serving never
sees a missing collection.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import uuid
from datetime import UTC, datetime

import redis
from confluent_kafka import Consumer

from infra.kafka import consumer_config
from infra.milvus import (
    collection_name,
    connect,
    create_item_collection,
    drop_collection,
    swap_alias,
    upsert_items,
)
from model.data import read_catalog, read_interactions, read_users
from model.evaluate import evaluate_candidates, time_split
from model.ranker import train_and_save as train_and_save_ranker
from model.registry import ModelRegistry, new_version, remove_artefacts, save_model
from model.train import ordered_unique, train_two_tower
from schemas.events import ControlCommand
from schemas.models import REFRESH_COMMAND, ModelVersion
from schemas.topics import Topics
from serving.config import Settings, load_settings

log = logging.getLogger("model.worker")
# Held-out events scored for the offline metrics of each refresh (a sample keeps a refresh quick).
EVAL_MAX_EVENTS = 3000


def offline_metrics(settings: Settings, events, items, users) -> dict[str, float]:
    """Train on the head of the log, score candidate recall on its tail (time order)."""
    train, test = time_split(events, settings.model.eval_holdout)
    if len(train) < 100 or not test:
        return {}
    model = train_two_tower(train, items, users, settings.model, version="holdout")
    stride = max(1, math.ceil(len(test) / EVAL_MAX_EVENTS))
    metrics = evaluate_candidates(model, items, users, train, test, settings.retrieval, k=500, stride=stride)
    metrics.update({k.replace("500", "100"): v for k, v in evaluate_candidates(
        model, items, users, train, test, settings.retrieval.model_copy(update={"max_candidates": 100}),
        k=100, stride=stride * 3).items() if k.startswith("recall")})
    return {k: float(v) for k, v in metrics.items()}


def refresh(settings: Settings, command_id: str | None = None, source: str | None = None) -> ModelVersion:
    """Train a new version from the log, index its items, swap the alias, move the live pointer."""
    started = time.perf_counter()
    registry = ModelRegistry(settings)
    source = source or settings.model.training_source
    events = ordered_unique(read_interactions(settings, source))
    items = read_catalog(settings)
    users = read_users(settings)
    snapshot_at = datetime.now(UTC)
    log.info("refresh_started command_id=%s events=%d items=%d users=%d", command_id, len(events), len(items), len(users))
    metrics = offline_metrics(settings, events, items, users) if settings.model.eval_holdout > 0 else {}
    version = new_version()
    if metrics and not settings.model.retrain_on_full_log:
        train, _ = time_split(events, settings.model.eval_holdout)
    else:
        train = events
    model = train_two_tower(train, items, users, settings.model, version=version)
    folder = save_model(settings, model)
    # The heavy ranker is versioned with the two-tower: trained on the same events, saved beside it.
    ranker_metrics = train_and_save_ranker(settings, model, train, items, users, folder)
    metrics = {**metrics, **{f"ranker_{k}": float(v) for k, v in (ranker_metrics or {}).items()}}
    collection = collection_name(settings, version)
    entry = ModelVersion(
        version=version, artefacts=str(folder), collection=collection, training_events=len(train),
        training_items=len(model.item_ids), source=source, command_id=command_id, metrics=metrics,
    )
    registry.put(entry)
    client = connect(settings)
    try:
        create_item_collection(client, collection, model.dim, settings)
        vectors = model.encode_items(items)
        upsert_items(client, collection, items, vectors, [not model.knows(i.item_id) for i in items])
        client.flush(collection)
        swap_alias(client, settings.retrieval.serving_alias, collection)
        entry = entry.model_copy(update={"training_seconds": round(time.perf_counter() - started, 1)})
        registry.put(entry)
        registry.set_live(version)
        catch_up(settings, client, model, collection, snapshot_at)
        retire_old_versions(settings, registry, client)
    except Exception:
        registry.put(entry.model_copy(update={"status": "failed"}))
        raise
    finally:
        client.close()
    log.info("refresh_done version=%s seconds=%.1f metrics=%s", version, time.perf_counter() - started, metrics)
    return registry.get(version) or entry


def catch_up(settings: Settings, client, model, collection: str, since: datetime) -> None:
    """Items changed while training went to the old collection: replay them into the new one."""
    from model.data import _parse_all, replay_topic
    from schemas.catalog import ItemRecord

    changed = {r.item_id: r for r in _parse_all(replay_topic(settings, Topics.CATALOG_ITEMS), ItemRecord)
               if r.updated_at >= since}
    if changed:
        records = list(changed.values())
        upsert_items(client, collection, records, model.encode_items(records),
                     [not model.knows(r.item_id) for r in records])
        log.info("catalog_catch_up items=%d", len(records))


def retire_old_versions(settings: Settings, registry: ModelRegistry, client) -> None:
    """Keep the newest ``keep_versions`` (the live one always); drop the rest everywhere."""
    live = registry.live_version()
    kept = 0
    for entry in registry.versions():  # newest first
        if entry.version == live or (kept < settings.model.keep_versions - 1 and entry.status != "failed"):
            kept += entry.version != live
            continue
        if entry.collection:
            drop_collection(client, entry.collection)
        remove_artefacts(entry.artefacts)
        registry.forget(entry.version)
        log.info("model_version_retired version=%s", entry.version)


def handle(settings: Settings, command: ControlCommand, lock_client: redis.Redis) -> ModelVersion | None:
    if command.command != REFRESH_COMMAND:
        return None
    lock = lock_client.lock(settings.keys.model_training_lock(), timeout=1800, blocking=False)
    if not lock.acquire():
        log.warning("refresh_skipped command_id=%s reason=another refresh is running", command.command_id)
        return None
    try:
        return refresh(settings, command.command_id, command.args.get("source"))
    finally:
        lock.release()


def run(settings: Settings, stop_after: int | None = None) -> int:
    """Consume the control topic; each refresh command trains one version. Returns commands handled."""
    # A refresh trains for minutes between polls: without a long max.poll.interval the
    # broker drops the trainer from its group mid-training and the commit afterwards fails.
    consumer = Consumer(consumer_config(settings, f"{settings.kafka.topic_prefix}trainer",
                                        **{"enable.auto.commit": False, "max.poll.interval.ms": 7_200_000}))
    consumer.subscribe([settings.topic(Topics.CONTROL)])
    lock_client = redis.Redis.from_url(settings.redis.url)
    handled = 0
    try:
        while stop_after is None or handled < stop_after:
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                continue
            try:
                command = ControlCommand.from_json(message.value())
            except ValueError as exc:
                log.warning("control_record_invalid error=%s", exc)
            else:
                try:
                    handle(settings, command, lock_client)
                except Exception:  # a failed refresh leaves the live version serving
                    log.exception("refresh_failed command_id=%s", command.command_id)
                handled += 1
            # Committed after handling: a crash mid-training retrains once more on restart.
            consumer.commit(message=message, asynchronous=False)
    finally:
        consumer.close()
    return handled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="train and publish one version now, then exit")
    parser.add_argument("--source", choices=["topic", "archive"], default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = load_settings()
    if args.once:
        entry = refresh(settings, f"cli-{uuid.uuid4().hex[:8]}", args.source)
        print(entry.model_dump_json(indent=2))
        return 0
    run(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
