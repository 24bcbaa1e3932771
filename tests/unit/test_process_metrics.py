"""Process-level metrics: the cycle collector's pauses are observed per generation."""

from __future__ import annotations

import gc

from serving import metrics


def _count(generation: str) -> float:
    value = metrics.REGISTRY.get_sample_value("recsys_gc_pause_seconds_count", {"generation": generation})
    return value or 0.0


def test_every_collection_is_observed_once_under_its_generation() -> None:
    metrics.track_gc_pauses()
    metrics.track_gc_pauses()  # a second call must not observe each pause twice
    gc.disable()  # no automatic collection in between: exactly the two asked for
    try:
        before_full, before_young = _count("2"), _count("0")
        gc.collect()
        gc.collect(0)
        after_full, after_young = _count("2"), _count("0")
    finally:
        gc.enable()
    assert after_full == before_full + 1
    assert after_young == before_young + 1
    total = metrics.REGISTRY.get_sample_value("recsys_gc_pause_seconds_sum", {"generation": "2"})
    assert total is not None and total > 0
