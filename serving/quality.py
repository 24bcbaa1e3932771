"""Live recommendation quality from the logs: CTR by surface, coverage, diversity, exposure Gini.

In: the ``catalog.items`` topic (from the start: which items exist and their
category), and the ``impressions`` and ``interactions`` topics (from now on).
Out: the ``recsys_quality_*`` gauges of serving/metrics.py over a sliding
window, exposed on their own port for Prometheus (alert rules watch for drops):

    python -m serving.quality            # metrics on observability.quality_metrics_port

- CTR(surface) = positive interactions attributed to the surface / items shown there;
- coverage = distinct active items shown / active items in the catalogue;
- intra-list diversity(surface) = mean share of item pairs of different categories per list;
- exposure Gini over every active item (unshown ones count as 0): 0 even, 1 all on one item.

:class:`QualityWindow` is the pure arithmetic (unit-tested); :class:`QualityMonitor`
feeds it from Kafka.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import combinations

from confluent_kafka import Consumer
from pydantic import ValidationError

from infra.kafka import consumer_config
from schemas.catalog import ItemRecord, ItemStatus
from schemas.events import ImpressionRecord, InteractionEvent, InteractionType, Surface
from schemas.topics import Topics
from serving.config import Settings, load_settings
from serving.metrics import (
    QUALITY_COVERAGE,
    QUALITY_CTR,
    QUALITY_DIVERSITY,
    QUALITY_EXPOSURE_GINI,
    serve_metrics,
)

log = logging.getLogger(__name__)

POSITIVE = frozenset({InteractionType.click, InteractionType.watch, InteractionType.like})


@dataclass
class _Bucket:
    shown: Counter[str] = field(default_factory=Counter)            # surface -> items shown
    positives: Counter[str] = field(default_factory=Counter)        # surface -> positive interactions
    exposure: Counter[str] = field(default_factory=Counter)         # item -> times shown
    diversity_sum: Counter[str] = field(default_factory=Counter)    # surface -> sum of list diversity
    lists_with_categories: Counter[str] = field(default_factory=Counter)


def gini(values: list[int]) -> float:
    """Gini coefficient of non-negative counts (0: all equal; -> 1: all on one)."""
    n = len(values)
    total = sum(values)
    if n == 0 or total == 0:
        return 0.0
    ordered = sorted(values)
    weighted = sum((i + 1) * v for i, v in enumerate(ordered))
    return (2 * weighted) / (n * total) - (n + 1) / n


def list_diversity(categories: list[str]) -> float:
    """Share of pairs in one list whose categories differ."""
    pairs = list(combinations(categories, 2))
    return sum(a != b for a, b in pairs) / len(pairs) if pairs else 0.0


class QualityWindow:
    """Sliding-window quality figures in fixed time buckets (pure logic, no I/O)."""

    def __init__(self, window_s: float, bucket_s: float = 60.0) -> None:
        self.bucket_s = bucket_s
        self.buckets: deque[tuple[int, _Bucket]] = deque(maxlen=max(1, int(window_s // bucket_s)))
        self.category: dict[str, str | None] = {}
        self.active: set[str] = set()

    def _bucket(self, now: float) -> _Bucket:
        index = int(now // self.bucket_s)
        if not self.buckets or self.buckets[-1][0] != index:
            self.buckets.append((index, _Bucket()))
        return self.buckets[-1][1]

    def observe_item(self, item: ItemRecord) -> None:
        self.category[item.item_id] = item.category
        if item.status == ItemStatus.active:
            self.active.add(item.item_id)
        else:
            self.active.discard(item.item_id)

    def observe_impression(self, impression: ImpressionRecord, now: float) -> None:
        bucket = self._bucket(now)
        surface = impression.surface.value
        bucket.shown[surface] += len(impression.item_ids)
        bucket.exposure.update(impression.item_ids)
        categories = [self.category.get(i) for i in impression.item_ids]
        known = [c for c in categories if c]
        if len(known) >= 2:
            bucket.diversity_sum[surface] += list_diversity(known)
            bucket.lists_with_categories[surface] += 1

    def observe_interaction(self, event: InteractionEvent, now: float) -> None:
        if event.interaction_type in POSITIVE and event.surface is not None:
            self._bucket(now).positives[event.surface.value] += 1

    def figures(self, now: float) -> dict[str, object]:
        """CTR and diversity by surface, coverage and Gini over the buckets still in the window."""
        oldest = int(now // self.bucket_s) - self.buckets.maxlen + 1  # type: ignore[operator]
        live = [b for index, b in self.buckets if index >= oldest]
        total = _Bucket()
        for b in live:
            for name in ("shown", "positives", "exposure", "diversity_sum", "lists_with_categories"):
                getattr(total, name).update(getattr(b, name))
        ctr = {s: total.positives[s] / total.shown[s] for s in total.shown if total.shown[s]}
        diversity = {s: total.diversity_sum[s] / n for s, n in total.lists_with_categories.items() if n}
        catalogue = self.active or set(total.exposure)
        shown_active = [i for i in total.exposure if i in catalogue]
        return {
            "ctr": ctr,
            "diversity": diversity,
            "coverage": len(shown_active) / len(catalogue) if catalogue else 0.0,
            "gini": gini([total.exposure.get(i, 0) for i in catalogue]),
        }

    def publish(self, now: float) -> dict[str, object]:
        """Set the Prometheus gauges from the current window; returns the figures."""
        figures = self.figures(now)
        for surface in Surface:
            if surface.value in figures["ctr"]:  # type: ignore[operator]
                QUALITY_CTR.labels(surface=surface.value).set(figures["ctr"][surface.value])  # type: ignore[index]
            if surface.value in figures["diversity"]:  # type: ignore[operator]
                QUALITY_DIVERSITY.labels(surface=surface.value).set(figures["diversity"][surface.value])  # type: ignore[index]
        QUALITY_COVERAGE.set(figures["coverage"])  # type: ignore[arg-type]
        QUALITY_EXPOSURE_GINI.set(figures["gini"])  # type: ignore[arg-type]
        return figures


class QualityMonitor:
    """Feeds a QualityWindow from the catalogue, impression and interaction topics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.window = QualityWindow(settings.observability.quality_window_s)
        group = f"quality-{uuid.uuid4().hex[:8]}"  # no shared offsets: every monitor reads for itself
        self.catalog = Consumer(consumer_config(settings, group + "-catalog", **{"enable.auto.commit": False}))
        self.catalog.subscribe([settings.topic(Topics.CATALOG_ITEMS)])
        self.events = Consumer(consumer_config(settings, group + "-events", **{"auto.offset.reset": "latest"}))
        self.events.subscribe([settings.topic(Topics.IMPRESSIONS), settings.topic(Topics.INTERACTIONS)])
        self.impressions_topic = settings.topic(Topics.IMPRESSIONS)
        self.skipped = 0

    def poll_once(self, timeout_s: float = 0.2) -> int:
        """Read what is available; returns how many records were applied."""
        applied = 0
        now = time.time()
        for message in self.catalog.consume(1000, timeout=0.0):
            applied += self._apply(message, ItemRecord, lambda r: self.window.observe_item(r))
        for message in self.events.consume(1000, timeout=timeout_s):
            if message.topic() == self.impressions_topic:
                applied += self._apply(message, ImpressionRecord,
                                       lambda r: self.window.observe_impression(r, now))
            else:
                applied += self._apply(message, InteractionEvent,
                                       lambda r: self.window.observe_interaction(r, now))
        return applied

    def _apply(self, message, model, observe) -> int:  # type: ignore[no-untyped-def]
        if message.error() is not None or message.value() is None:
            return 0
        try:
            observe(model.from_json(message.value()))
        except ValidationError:
            self.skipped += 1  # bad records are the flows' dead letters; here they are only skipped
            return 0
        return 1

    def run(self, publish_every_s: float = 15.0) -> None:
        last = 0.0
        while True:
            self.poll_once(timeout_s=0.5)
            if time.monotonic() - last >= publish_every_s:
                figures = self.window.publish(time.time())
                log.info("quality_published figures=%s", figures)
                last = time.monotonic()

    def close(self) -> None:
        self.catalog.close()
        self.events.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    settings = load_settings()
    from serving.logging import configure_logging

    configure_logging(settings)
    serve_metrics(settings.observability.quality_metrics_port, addr=settings.api.host)
    monitor = QualityMonitor(settings)
    try:
        monitor.run()
    finally:
        monitor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
