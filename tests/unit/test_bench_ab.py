"""bench.ab's summary of alternating rounds (pure logic; the runs themselves need the stack)."""

from bench.ab import summarise


def test_summary_is_the_median_of_rounds_and_keeps_each_p99() -> None:
    rounds = [{"p50_ms": p50, "p99_ms": p99, "rps": 30.0, "server_cpu_ms_per_request": cpu,
               "milvus_cpu_ms_per_request": 15.0, "requests": 300}
              for p50, p99, cpu in ((20.0, 40.0, 14.0), (30.0, 90.0, 20.0), (25.0, 50.0, 15.0))]
    summary = summarise(rounds)
    assert (summary["p50_ms"], summary["p99_ms"], summary["api_cpu_ms_per_request"]) == (25.0, 50.0, 15.0)
    assert summary["p99_ms_each_round"] == [40.0, 90.0, 50.0] and summary["requests"] == 900
