"""Flow lag arithmetic from the producer's and a flow's progress notes (serving/lag.py)."""

from __future__ import annotations

import math

from serving.lag import flow_lag


def test_caught_up_flow_has_no_lag() -> None:
    produced = {"ev:0": 41, "ev:1": 17}
    lag = flow_lag(produced, dict(produced), {"ev": 10_000.0}, {"ev": 9_990.0}, now_ms=12_000.0)
    assert lag["records"] == 0
    assert lag["seconds"] == 0.01  # the ack comes a little after the record's own timestamp
    assert lag["freshness_seconds"] == 2.01


def test_records_and_seconds_behind_are_counted_per_partition() -> None:
    produced = {"ev:0": 41, "ev:1": 17, "ev:2": 5}
    read = {"ev:0": 40, "ev:1": 7}  # partition 2 not read at all yet: its 6 records are behind
    lag = flow_lag(produced, read, {"ev": 60_000.0}, {"ev": 45_000.0}, now_ms=61_000.0)
    assert lag["records"] == 1 + 10 + 6
    assert lag["seconds"] == 15.0


def test_topics_the_flow_does_not_read_do_not_count() -> None:
    produced = {"ev:0": 9, "catalog:0": 1_000}
    lag = flow_lag(produced, {"ev:0": 9}, {"ev": 5.0, "catalog": 9_999.0}, {"ev": 5.0}, now_ms=10.0)
    assert lag["records"] == 0 and lag["seconds"] == 0


def test_a_replay_ahead_of_the_notes_never_gives_negative_lag() -> None:
    lag = flow_lag({"ev:0": 3}, {"ev:0": 9}, {"ev": 1.0}, {"ev": 2.0}, now_ms=2.0)
    assert lag["records"] == 0 and lag["seconds"] == 0 and lag["freshness_seconds"] == 0


def test_no_time_notes_leave_freshness_unknown() -> None:
    assert math.isnan(flow_lag({}, {"ev:0": 1}, {}, {}, now_ms=1.0)["freshness_seconds"])
