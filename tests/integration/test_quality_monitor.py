"""The live quality monitor reads the real topics and sets the Prometheus gauges."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from infra.kafka import producer_config
from schemas.catalog import ItemRecord
from schemas.events import ImpressionRecord, InteractionEvent
from schemas.topics import Topics
from serving.config import Settings
from serving.quality import QualityMonitor

pytestmark = pytest.mark.integration


def test_monitor_publishes_ctr_coverage_and_gini_from_the_log(settings: Settings) -> None:
    producer = Producer(producer_config(settings))
    for item, category in (("m1", "drama"), ("m2", "comedy"), ("m3", "drama"), ("m4", "horror")):
        producer.produce(settings.topic(Topics.CATALOG_ITEMS), key=item,
                         value=ItemRecord(item_id=item, category=category).to_json())
    producer.flush(10)

    monitor = QualityMonitor(settings)
    try:
        deadline = time.monotonic() + 30
        while not monitor.events.assignment() and time.monotonic() < deadline:
            monitor.poll_once(timeout_s=0.2)  # join the group before anything is produced
        assert monitor.events.assignment(), "monitor never got its partitions"
        impression = ImpressionRecord(request_id="r1", user_id="u1", surface="related",
                                      item_ids=["m1", "m2"], served_from="live")
        producer.produce(settings.topic(Topics.IMPRESSIONS), key="u1", value=impression.to_json())
        producer.produce(settings.topic(Topics.INTERACTIONS), key="u1", value=InteractionEvent(
            user_id="u1", item_id="m1", interaction_type="click", surface="related").to_json())
        producer.produce(settings.topic(Topics.IMPRESSIONS), key="u1", value=b'{"broken": true}')
        producer.flush(10)
        applied = 0
        while applied < 6 and time.monotonic() < deadline:  # 4 items + 1 impression + 1 click
            applied += monitor.poll_once(timeout_s=0.3)
        figures = monitor.window.publish(time.time())
    finally:
        monitor.close()

    assert figures["ctr"] == {"related": 0.5}
    assert REGISTRY.get_sample_value("recsys_quality_ctr", {"surface": "related"}) == 0.5
    assert REGISTRY.get_sample_value("recsys_quality_catalog_coverage") == 0.5
    assert REGISTRY.get_sample_value("recsys_quality_intra_list_diversity", {"surface": "related"}) == 1.0
    assert REGISTRY.get_sample_value("recsys_quality_exposure_gini") == pytest.approx(0.5)
    assert monitor.skipped == 1
